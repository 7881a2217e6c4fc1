"""End to end: a real `bagel serve` (subprocess, tiny golden checkpoint) driven over loopback by
httpx and by the official openai client. Checks answers against the engine called in-process."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import statistics
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from bagel_engine.think_text import split_think
from test_serve_support import INPUT_IMAGE, TINY, ServerProcess, data_url, decode_b64_image, png_bytes

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
try:
    import openai
except ImportError:  # the httpx tests still run
    openai = None

KEY = "test-key-123"
FAST = {"num_timesteps": 3}  # 2 denoising steps: each request is a few milliseconds on CPU


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "in.png").write_bytes(INPUT_IMAGE.read_bytes())
    srv = ServerProcess(
        "--no-ui", "--queue-size", "1", "--max-batch", "2", "--api-key", KEY, "--max-body-mb", "0.5", "--max-images", "3",
        "--max-image-pixels", "20000", "--allow-local-paths", str(allowed), "--log-level", "warning",
        "--max-timesteps", "100000",  # the overload and cancel tests make jobs long with many timesteps
        # the thread count of this process: the in-process engine then computes the very same numbers
        env={"OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    srv.allowed = allowed
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pipe():
    import bagel_engine

    return bagel_engine.load(str(TINY))


@pytest.fixture()
def client(server):
    with server.client(KEY) as c:
        yield c


@pytest.fixture()
def oai(server):
    if openai is None:
        pytest.skip("the official openai client is not installed (dev extra)")
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def _same_image(a: Image.Image, b: Image.Image) -> bool:
    """Equal up to float rounding: the server runs with another thread count than this process, which
    moves a rare pixel by 1 (a changed knob moves most pixels by much more)."""
    pa, pb = _pixels(a), _pixels(b)
    if pa.shape != pb.shape:
        return False
    diff = np.abs(pa - pb)
    return int(diff.max()) <= 2 and float((diff > 0).mean()) < 0.01


# ---------------------------------------------------------------------------------------------
def test_health_is_open_and_everything_else_needs_the_key(server):
    r = httpx.get(server.base_url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(server.base_url + path).status_code == 401
        bad = httpx.get(server.base_url + path, headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    r = httpx.post(server.base_url + "/v1/images/generations", json={"prompt": "x", "size": "32x32"})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    if openai is not None:
        wrong = openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


def test_models(oai):
    ids = [m.id for m in oai.models.list().data]
    assert ids == [str(TINY)]


def test_generate_with_openai_client_matches_the_engine(oai, pipe):
    knobs = {"seed": 7, "num_timesteps": 3, "cfg_text_scale": 3.0, "cfg_interval": [0.2, 1.0],
             "cfg_renorm_type": "channel", "timestep_shift": 2.0}
    res = oai.images.generate(prompt="a red fox", size="32x48", n=2, response_format="b64_json", extra_body=knobs)
    assert len(res.data) == 2
    imgs = [decode_b64_image(d.b64_json) for d in res.data]
    assert all(im.size == (32, 48) and im.format == "PNG" for im in imgs)
    assert [d.model_extra["seed"] for d in res.data] == [7, 8]
    kw = {k: v for k, v in knobs.items() if k != "seed"}
    kw["cfg_interval"] = tuple(kw["cfg_interval"])
    for i, im in enumerate(imgs):
        ref = pipe.generate("a red fox", width=32, height=48, seed=7 + i, **kw).image
        assert _same_image(im, ref), f"image {i} differs from the engine's"
    # the knobs are applied, not dropped: another renorm type gives another image
    other = oai.images.generate(prompt="a red fox", size="32x48", extra_body={**knobs, "cfg_renorm_type": "global"})
    assert np.abs(_pixels(decode_b64_image(other.data[0].b64_json)) - _pixels(imgs[0])).mean() > 2


def test_generate_defaults_and_formats(client):
    r = client.post("/v1/images/generations", json={"prompt": "a boat", "size": "auto", "seed": 1, **FAST,
                                                    "output_format": "webp", "model": "bagel"})
    assert r.status_code == 200, r.text
    img = decode_b64_image(r.json()["data"][0]["b64_json"])
    assert img.format == "WEBP" and img.size == (96, 96)  # the tiny model's largest side
    assert r.json()["size"] == "96x96"


def test_generate_with_think_returns_the_think_text(client, pipe):
    body = {"prompt": "a cat", "size": "32x32", "seed": 3, "think": True, "max_think_token_n": 6, **FAST}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    ref = pipe.generate("a cat", width=32, height=32, seed=3, think=True, max_think_token_n=6, **FAST)
    assert r.json()["data"][0]["revised_prompt"] == ref.text


def test_edit_multipart_several_images_with_openai_client(oai, pipe):
    a = INPUT_IMAGE.read_bytes()
    b = png_bytes(40, 48)
    res = oai.images.edit(
        image=[("a.png", a, "image/png"), ("b.png", b, "image/png")], prompt="make it blue",
        extra_body={"seed": 11, "cfg_interval": [0.0, 1.0], "cfg_img_scale": 1.5, **FAST},
    )
    img = decode_b64_image(res.data[0].b64_json)
    ref = pipe.edit([Image.open(io.BytesIO(a)), Image.open(io.BytesIO(b))], "make it blue", seed=11,
                    cfg_interval=(0.0, 1.0), cfg_img_scale=1.5, **FAST).image
    assert img.size == ref.size  # the last input image's resized size
    assert _same_image(img, ref)


def test_edit_single_image_and_json_body(client, server):
    r = client.post("/v1/images/edits", files={"image": ("a.png", INPUT_IMAGE.read_bytes(), "image/png")},
                    data={"prompt": "add a hat", "n": "2", "think": "false", "seed": "5", "num_timesteps": "3",
                          "cfg_interval": "0.1,1.0"})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2
    r2 = client.post("/v1/images/edits", json={"prompt": "add a hat", "image": data_url(INPUT_IMAGE.read_bytes()),
                                               "seed": 5, "num_timesteps": 3, "cfg_interval": [0.1, 1.0]})
    assert r2.status_code == 200, r2.text
    assert r2.json()["data"][0]["b64_json"] == r.json()["data"][0]["b64_json"]
    # a file under --allow-local-paths may be named; the same image gives the same answer
    r3 = client.post("/v1/images/edits", json={"prompt": "add a hat", "image": str(server.allowed / "in.png"),
                                               "seed": 5, "num_timesteps": 3, "cfg_interval": [0.1, 1.0]})
    assert r3.status_code == 200, r3.text
    assert r3.json()["data"][0]["b64_json"] == r.json()["data"][0]["b64_json"]


def test_chat_understanding_text_and_think(oai, pipe):
    img = INPUT_IMAGE.read_bytes()
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"},
                                         {"type": "image_url", "image_url": {"url": data_url(img)}}]}]
    res = oai.chat.completions.create(model=str(TINY), messages=msgs, max_tokens=8, extra_body={"seed": 1})
    ref = pipe.understand(Image.open(io.BytesIO(img)), "What is in the picture?", max_new_tokens=8)
    assert res.choices[0].message.content == ref.text
    assert res.choices[0].message.role == "assistant"

    plain = oai.chat.completions.create(model="bagel", messages=[{"role": "user", "content": "Hello"}], max_tokens=6)
    assert plain.choices[0].message.content == pipe.chat("Hello", max_new_tokens=6).text

    think = oai.chat.completions.create(model="bagel", messages=[{"role": "user", "content": "Hello"}],
                                        max_tokens=6, extra_body={"think": True})
    plan, answer = split_think(pipe.chat("Hello", think=True, max_new_tokens=6).text)
    msg = think.choices[0].message
    assert msg.content == answer
    assert msg.model_extra["reasoning_content"] == (plan or "")


def test_chat_reports_usage_and_why_it_stopped(oai, pipe):
    cut = oai.chat.completions.create(model="bagel", messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
    ref = pipe.chat("Hello", max_new_tokens=4)
    assert cut.choices[0].finish_reason == ref.finish_reason
    assert cut.usage.completion_tokens == ref.completion_tokens and cut.usage.prompt_tokens == ref.prompt_tokens
    assert cut.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens and ref.prompt_tokens > 1
    # the tiny random model never writes its end token: a cap always cuts it
    assert ref.finish_reason == "length" and ref.completion_tokens == 3


@pytest.mark.parametrize("think", [False, True])
def test_streamed_chat_assembles_to_the_whole_answer(oai, think):
    msgs = [{"role": "user", "content": "Hello there"}]
    whole = oai.chat.completions.create(model="bagel", messages=msgs, max_tokens=12, extra_body={"think": think})
    stream = oai.chat.completions.create(model="bagel", messages=msgs, max_tokens=12, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"think": think})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert reasoning == (whole.choices[0].message.model_extra.get("reasoning_content") or "")
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c for c in chunks if c.choices and (c.choices[0].delta.content or
                                                  (c.choices[0].delta.model_extra or {}).get("reasoning_content"))]
    if not think:  # (with think on, text that never opens a think block waits for the end: it may still be one)
        assert len(pieces) > 1  # it came in pieces, not in one block at the end
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_a_streamed_chat_whose_client_leaves_is_cancelled(server, client):
    body = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 3000, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    for _ in range(200):  # the worker is free again long before 3000 tokens
        if client.get("/health").json().get("busy") is False:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the streamed job went on after its client left")
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200


def _sse(response) -> list[tuple[str | None, dict | str]]:
    """(event name, data) of each server-sent event."""
    out, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data = line[len("data: "):]
            out.append((name, data if data == "[DONE]" else json.loads(data)))
            name = None
    return out


def test_streamed_generation_sends_previews_then_the_image(client, pipe):
    body = {"prompt": "a red fox", "size": "32x32", "seed": 9, "num_timesteps": 9, "stream": True,
            "partial_images": 2}
    with client.stream("POST", "/v1/images/generations", json=body) as r:
        assert r.status_code == 200, r.read()
        events = _sse(r)
    names = [n for n, _ in events]
    assert names == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    partial, final = [d for _, d in events[:2]], events[-1][1]
    assert [p["partial_image_index"] for p in partial] == [0, 1] and partial[0]["step"] < partial[1]["step"] < 8
    ref = pipe.generate("a red fox", height=32, width=32, seed=9, num_timesteps=9)
    done = Image.open(io.BytesIO(base64.b64decode(final["b64_json"])))
    assert _same_image(done, ref.image) and final["size"] == "32x32"
    previews = [Image.open(io.BytesIO(base64.b64decode(p["b64_json"]))) for p in partial]
    assert all(im.size == (32, 32) for im in previews) and not _same_image(previews[0], ref.image)
    edit = {"prompt": "make it blue", "image": data_url(png_bytes(32, 32)), "num_timesteps": 5, "stream": True,
            "partial_images": 1}
    with client.stream("POST", "/v1/images/edits", json=edit) as r:
        assert r.status_code == 200, r.read()
        assert [n for n, _ in _sse(r)] == ["image_edit.partial_image", "image_edit.completed"]
    # the rules: previews need stream, stream draws one image
    for bad in ({"partial_images": 1}, {"stream": True, "n": 2}, {"stream": True, "partial_images": 4}):
        r = client.post("/v1/images/generations", json={"prompt": "x", "size": "32x32", **bad})
        assert r.status_code == 400, r.text


def test_the_api_previews_each_step_and_the_last_is_the_result(pipe):
    seen = []
    out = pipe.generate("a fox", height=32, width=32, seed=2, num_timesteps=4, on_step=seen.append)
    assert [(p.step, p.total, p.index) for p in seen] == [(1, 3, 0), (2, 3, 0), (3, 3, 0)]
    torch.testing.assert_close(seen[-1].latent(), out.latents)  # the last step predicts the final latent
    assert seen[0].image().size == (32, 32)


def test_chat_multi_turn_uses_the_whole_conversation(oai):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Draw?"}]
    res = oai.chat.completions.create(model="bagel", messages=msgs, max_tokens=5, temperature=0)
    assert isinstance(res.choices[0].message.content, str)


def test_chat_image_modality_returns_an_image(oai, pipe):
    res = oai.chat.completions.create(
        model="bagel", messages=[{"role": "user", "content": "a green tree"}], modalities=["image"],
        extra_body={"size": "32x32", "seed": 4, "think": True, "max_think_token_n": 5, **FAST},
    )
    msg = res.choices[0].message
    url = msg.model_extra["images"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    img = decode_b64_image(url.split(",", 1)[1])
    ref = pipe.generate("a green tree", width=32, height=32, seed=4, think=True, max_think_token_n=5, **FAST)
    assert _same_image(img, ref.image)
    assert msg.model_extra["reasoning_content"] == ref.text

    # with an input image the chat edits it
    res = oai.chat.completions.create(
        model="bagel", modalities=["image"], extra_body={"seed": 2, **FAST},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                                               {"type": "text", "text": "make it green"}]}],
    )
    assert decode_b64_image(res.choices[0].message.model_extra["images"][0]["image_url"]["url"].split(",")[1]).size


# ---------------------------------------------------------------------------------------------
BAD_JSON = [
    # (endpoint, body, status, words the error message must contain, param)
    ("/v1/images/generations", {"size": "32x32"}, 400, ["missing", "prompt"], "prompt"),
    ("/v1/images/generations", {"prompt": "   ", "size": "32x32"}, 400, ["prompt", "empty"], "prompt"),
    ("/v1/images/generations", {"prompt": "x", "size": "33x32"}, 400, ["33", "multiple of 4"], "size"),
    ("/v1/images/generations", {"prompt": "x", "size": "1024x1024"}, 400, ["1024", "96"], "size"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, ["WIDTHxHEIGHT"], "size"),
    ("/v1/images/generations", {"prompt": "x", "size": "32x32", "negativ_prompt": "y", "guidance": 2}, 400,
     ["unknown", "'negativ_prompt'", "'guidance'"], "negativ_prompt"),
    ("/v1/images/generations", {"prompt": "x", "n": "2"}, 400, ["'n'", "integer"], "n"),
    ("/v1/images/generations", {"prompt": "x", "n": 9}, 400, ["n=9", "--max-images"], "n"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "jpeg"}, 400, ["response_format"],
     "response_format"),
    ("/v1/images/generations", {"prompt": "x", "cfg_renorm_type": "fancy"}, 400, ["cfg_renorm_type"],
     "cfg_renorm_type"),
    ("/v1/images/generations", {"prompt": "x", "cfg_interval": [0.9, 0.1]}, 400, ["cfg_interval"], "cfg_interval"),
    ("/v1/images/generations", {"prompt": "x", "num_timesteps": 1}, 400, ["num_timesteps"], "num_timesteps"),
    ("/v1/images/generations", {"prompt": "x", "model": "dall-e-3"}, 404, ["dall-e-3"], "model"),
    ("/v1/images/edits", {"prompt": "x", "image": "data:image/png;base64,AAAA"}, 400, ["is not an image"],
     "image[0]"),
    ("/v1/images/edits", {"prompt": "x", "image": "/etc/passwd"}, 400, ["outside", "--allow-local-paths"],
     "image[0]"),
    ("/v1/images/edits", {"prompt": "x", "image": "http://127.0.0.1:9/a.png"}, 400, ["--allow-remote-urls"],
     "image[0]"),
    ("/v1/images/edits", {"prompt": "x", "image": [data_url(png_bytes())] * 4}, 400, ["4 input images",
                                                                                      "--max-images"], "image"),
    ("/v1/images/edits", {"prompt": "x", "image": data_url(png_bytes(200, 200))}, 400,
     ["200x200", "--max-image-pixels"], "image[0]"),
    ("/v1/images/edits", {"prompt": "x", "image": data_url(png_bytes()), "size": "64x64"}, 400, ["'auto'"], "size"),
    ("/v1/chat/completions", {"messages": []}, 400, ["messages"], "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                              "modalities": ["image"]}, 400, ["stream applies to text"], "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "stream_options": {"include_usage": True}}, 400, ["only with stream"], None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400,
     ["top_p"], "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "audio", "data": "x"}]}]}, 400,
     ["messages.0.content.0"], "messages.0.content.0.type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "cfg_text_scale": 4}, 400,
     ["cfg_text_scale", '["image"]'], "cfg_text_scale"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5,
                              "do_sample": True}, 400, ["temperature"], "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}, {"type": "text", "text": "q"}]}]},
     400, ["base64"], "messages[0].content[0].image_url"),
]


@pytest.mark.parametrize("endpoint,body,status,words,param", BAD_JSON,
                         ids=[f"{i}-{c[0].rsplit('/', 1)[-1]}-{c[4]}" for i, c in enumerate(BAD_JSON)])
def test_bad_json_requests_are_refused_and_named(client, endpoint, body, status, words, param):
    r = client.post(endpoint, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    for w in words:
        assert w in err["message"], (w, err)
    assert err["param"] == param


def test_requests_beyond_the_limits_get_a_400_naming_the_limit_and_the_server_stays_up(client):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ("/v1/chat/completions", {**chat, "max_tokens": 2**31}, "max_model_len"),
        ("/v1/chat/completions", {**chat, "max_completion_tokens": 10**7}, "max_model_len"),
        ("/v1/images/generations", {"prompt": "x", "num_timesteps": 200000}, "max_timesteps"),
        # ~45k tokens of prompt: longer than the model's 32,768-token context
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a b c " * 15000}]}, "max_model_len"),
    ]
    for endpoint, body, word in cases:
        t0 = time.perf_counter()
        r = client.post(endpoint, json=body)
        assert r.status_code == 400, (endpoint, r.status_code, r.text[:300])
        assert word in r.json()["error"]["message"]
        assert time.perf_counter() - t0 < 30  # refused before any allocation (the time is generous: CI noise)
    assert client.get("/health").status_code == 200
    r = client.post("/v1/chat/completions", json={**chat, "max_tokens": 3})
    assert r.status_code == 200


def test_bad_bodies(client):
    r = client.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/images/generations", json=[1, 2])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    # oversize body: refused from the Content-Length header, and when streamed without one
    big = b"x" * 600_000
    r = client.post("/v1/images/generations", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]["message"]
    r = client.post("/v1/images/generations", content=iter([big[:300_000], big[300_000:]]),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_bad_multipart_edits(client):
    good = ("image", ("a.png", png_bytes(), "image/png"))
    cases = [
        ([("image", ("a.png", b"definitely not a png", "image/png"))], {"prompt": "x"}, ["is not an image"],
         "image"),
        ([good], {}, ["missing", "'prompt'"], "prompt"),
        ([("prompt", (None, "x"))], {}, ["'image'"], "image"),
        ([good], {"prompt": "x", "strength": "0.5"}, ["unknown", "'strength'"], "strength"),
        ([good, ("mask", ("m.png", png_bytes(), "image/png"))], {"prompt": "x"}, ["mask"], "mask"),
        ([good], {"prompt": "x", "num_timesteps": "many"}, ["num_timesteps"], "num_timesteps"),
        ([good], {"prompt": "x", "cfg_interval": "0.5"}, ["cfg_interval"], "cfg_interval"),
        ([good], {"prompt": "x", "n": ["1", "2"]}, ["more than once"], "n"),
        ([("image", ("big.png", png_bytes(200, 200), "image/png"))], {"prompt": "x"}, ["--max-image-pixels"],
         "image"),
        ([good] * 4, {"prompt": "x"}, ["4 input images"], "image"),
    ]
    for files, data, words, param in cases:
        r = client.post("/v1/images/edits", files=files, data=data)
        assert r.status_code == 400, (data, r.text)
        err = r.json()["error"]
        assert all(w in err["message"] for w in words), (words, err)
        assert err["param"] == param, err
    r = client.post("/v1/images/edits", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_openai_client_sees_bad_requests_as_errors(oai):
    with pytest.raises(openai.BadRequestError, match="unknown.*'shiny'"):
        oai.images.generate(prompt="x", size="32x32", extra_body={"shiny": True})
    with pytest.raises(openai.BadRequestError, match="size"):
        oai.images.generate(prompt="x", size="1024x1792")


def test_metrics_are_prometheus_text(client):
    client.post("/v1/images/generations", json={"prompt": "m", "size": "32x32", **FAST})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for needle in ('bagel_requests_total{endpoint="/v1/images/generations",status="200"}',
                   "bagel_queue_depth ", "bagel_queue_capacity 1", "bagel_jobs_in_progress ",
                   'bagel_request_duration_seconds_bucket{endpoint="/v1/images/generations",le="+Inf"}',
                   'bagel_job_duration_seconds_count{kind="generate"}', "process_resident_memory_bytes "):
        assert needle in text, needle
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            float(value)


# ---------------------------------------------------------------------------------------------
def _slow_body(steps: int) -> dict:
    return {"prompt": "slow", "size": "32x32", "num_timesteps": steps, "seed": 0}


def _steps_for(client, seconds: float) -> int:
    """Timesteps that make one 32x32 request last about ``seconds`` on this machine."""
    t0 = time.perf_counter()
    r = client.post("/v1/images/generations", json=_slow_body(60))
    assert r.status_code == 200
    per_step = max((time.perf_counter() - t0) / 60, 1e-4)
    return max(20, int(seconds / per_step))


def test_overload_gives_429_and_the_rest_succeed(server, client):
    steps = _steps_for(client, 1.0)

    def one(_):
        with server.client(KEY, timeout=120) as c:
            r = c.post("/v1/images/generations", json=_slow_body(steps))
            return r.status_code, r.headers.get("retry-after"), r.json()

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        time.sleep(0.3)
        t0 = time.perf_counter()
        health = httpx.get(server.base_url + "/health", timeout=10)  # answers while the model is busy
        health_s = time.perf_counter() - t0
        results = [f.result() for f in futures]
    assert health.status_code == 200 and health_s < 2.0
    codes = sorted(code for code, _, _ in results)
    assert set(codes) <= {200, 429}, results
    assert codes.count(429) >= 1 and codes.count(200) >= 2, codes  # two run (batched), one waits, the rest are refused
    for code, retry_after, body in results:
        if code == 429:
            assert retry_after is not None and int(retry_after) >= 1
            assert body["error"]["code"] == "queue_full"
        else:
            assert len(body["data"]) == 1
    r = client.post("/v1/images/generations", json={"prompt": "after", "size": "32x32", **FAST})
    assert r.status_code == 200
    assert 'bagel_requests_total{endpoint="/v1/images/generations",status="429"}' in client.get("/metrics").text


def _metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_client_disconnect_cancels_the_job(server, client):
    steps = _steps_for(client, 20.0)  # long enough that only a cancel ends it quickly
    counter = 'bagel_jobs_total{kind="generate",outcome="cancelled"}'
    before = _metric(client, counter)
    with pytest.raises(httpx.ReadTimeout):
        with server.client(KEY, timeout=httpx.Timeout(60, read=1.0)) as c:
            c.post("/v1/images/generations", json=_slow_body(steps))
    t0 = time.perf_counter()
    while _metric(client, counter) < before + 1:
        assert time.perf_counter() - t0 < 10, "the job was not cancelled"
        time.sleep(0.1)
    r = client.post("/v1/images/generations", json={"prompt": "next", "size": "32x32", **FAST})
    assert r.status_code == 200
    assert time.perf_counter() - t0 < 10


def test_100_sequential_requests_keep_memory_and_latency_flat(server, client):
    """Generations (JSON), edits (multipart upload) and chats in turn; windows of 25 requests hold the
    same mix (25 = 0 mod 3 at the first and the last window)."""
    image = png_bytes(40, 48)

    def request(i: int) -> httpx.Response:
        if i % 3 == 0:
            return client.post("/v1/images/generations", json={"prompt": "steady", "size": "32x32", "seed": i, **FAST})
        if i % 3 == 1:
            return client.post("/v1/images/edits", files={"image": ("a.png", image, "image/png")},
                               data={"prompt": "steady", "seed": str(i), "num_timesteps": "3"})
        return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "steady"}],
                                                          "max_tokens": 4})

    for i in range(12):  # warm up allocator pools and caches
        assert request(i).status_code == 200
    rss_start = server.rss_bytes()
    latencies, rss, cpu = [], [], [server.cpu_seconds()]
    for i in range(100):
        t0 = time.perf_counter()
        r = request(i)
        latencies.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
        if i % 10 == 9:
            rss.append(server.rss_bytes())
        if i % 25 == 24:
            cpu.append(server.cpu_seconds())
    growth = rss[-1] - rss_start
    first, last = statistics.median(latencies[:25]), statistics.median(latencies[-25:])
    cpu_per_window = [b - a for a, b in zip(cpu, cpu[1:])]  # server CPU seconds per 25 requests
    print(f"\nRSS {rss_start / 2**20:.1f} -> {rss[-1] / 2**20:.1f} MiB (every 10: "
          f"{[round(x / 2**20, 1) for x in rss]}); median latency first 25 {first * 1e3:.1f} ms, "
          f"last 25 {last * 1e3:.1f} ms; server CPU s per 25 requests {[round(x, 2) for x in cpu_per_window]}")
    # Generous, noise-aware bounds. Memory: a leak of even 0.25 MiB per request would add 25 MiB.
    assert growth < 24 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 100 requests"
    assert rss[-1] - rss[4] < 12 * 2**20, "RSS still growing in the second half"
    # Work per request: the server's own CPU time (insensitive to other processes on the machine).
    assert cpu_per_window[-1] <= cpu_per_window[0] * 1.5 + 0.1, f"CPU per request grew: {cpu_per_window}"
    # Wall clock only as a coarse guard against a server that slows to a crawl or hangs.
    assert last < first * 3 + 0.05, f"latency grew: {first:.4f} s -> {last:.4f} s"
    assert httpx.get(server.base_url + "/health").json()["queue_depth"] == 0
