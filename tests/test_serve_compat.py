"""What neighbours' clients send, against a real `bagel serve` over loopback (issue 13, points 1-3):
OpenAI fields that change nothing are ignored with a Warning header (``--strict`` refuses them),
vllm-omni's nested ``extra_body``, diffusers' knob names, the negative prompt, top_p / top_k / stop,
chat ``n`` and ``response_format="url"``; answers compared with the engine called in-process."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from test_serve_support import ServerProcess, decode_b64_image

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
openai = pytest.importorskip("openai", reason="the official openai client (dev extra)")

KEY = "compat-key"
FAST = {"num_timesteps": 3}


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--no-ui", "--api-key", KEY, "--url-ttl", "60", "--log-level", "warning",
                        env={"OMP_NUM_THREADS": str(torch.get_num_threads())})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def strict_server():
    srv = ServerProcess("--no-ui", "--strict", "--log-level", "warning")
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with server.client(KEY) as c:
        yield c


@pytest.fixture()
def oai(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_b64_image(b64).convert("RGB"), dtype=np.int16)


def _gen(client, **body):
    r = client.post("/v1/images/generations", json={"prompt": "a red square", "size": "32x32", "seed": 5, **body})
    assert r.status_code == 200, r.text
    return r


def test_openai_extras_are_ignored_with_a_warning(oai, server):
    raw = oai.images.with_raw_response.generate(prompt="a red square", size="32x32", quality="high", style="vivid",
                                                user="u-1", extra_body={"seed": 5, **FAST})
    warning = raw.headers.get("warning", "")
    assert "quality" in warning and "style" in warning and "user" in warning, warning
    image = raw.parse().data[0]
    # the same picture as without the extras
    with server.client(KEY) as c:
        plain = _gen(c, **FAST).json()["data"][0]["b64_json"]
    assert np.array_equal(_pixels(image.b64_json), _pixels(plain))


def test_no_warning_header_when_nothing_is_ignored(client):
    assert "warning" not in _gen(client, **FAST).headers


def test_strict_server_refuses_the_extras(strict_server):
    with strict_server.client() as c:
        r = c.post("/v1/images/generations", json={"prompt": "a cat", "size": "32x32", "quality": "high", **FAST})
    assert r.status_code == 400 and r.json()["error"]["param"] == "quality", r.text


def test_reasoning_effort_is_ignored_in_chat(oai):
    raw = oai.chat.completions.with_raw_response.create(
        model="bagel", messages=[{"role": "user", "content": "hi"}], max_tokens=3, reasoning_effort="low")
    assert "reasoning_effort" in raw.headers.get("warning", "")
    assert raw.parse().choices[0].message.content is not None


def test_nested_extra_body_reads_like_top_level_fields(client):
    top = _gen(client, num_timesteps=3, cfg_text_scale=2.0).json()["data"][0]["b64_json"]
    nested = _gen(client, extra_body={"num_timesteps": 3, "cfg_text_scale": 2.0}).json()["data"][0]["b64_json"]
    assert np.array_equal(_pixels(top), _pixels(nested))
    r = client.post("/v1/images/generations", json={"prompt": "a cat", "seed": 1, "extra_body": {"seed": 2}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    r = client.post("/v1/images/generations", json={"prompt": "a cat", "extra_body": [1]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "extra_body", r.text


def test_diffusers_names_are_aliases(client):
    official = _gen(client, num_timesteps=4, cfg_text_scale=2.5).json()["data"][0]["b64_json"]
    aliased = _gen(client, num_inference_steps=3, guidance_scale=2.5).json()["data"][0]["b64_json"]
    assert np.array_equal(_pixels(official), _pixels(aliased))  # 3 denoising steps = 4 schedule points
    r = client.post("/v1/images/generations", json={"prompt": "a cat", "guidance_scale": 2, "cfg_text_scale": 3})
    assert r.status_code == 400 and "given twice" in r.json()["error"]["message"], r.text
    two = _gen(client, num_images_per_prompt=2, **FAST).json()["data"]
    assert len(two) == 2
    r = client.post("/v1/images/generations", json={"prompt": "a cat", "n": 2, "num_images_per_prompt": 2})
    assert r.status_code == 400, r.text


def test_negative_prompt_changes_the_picture_and_empty_is_none(client):
    plain = _pixels(_gen(client, cfg_text_scale=4.0, **FAST).json()["data"][0]["b64_json"])
    empty = _pixels(_gen(client, cfg_text_scale=4.0, negative_prompt="", **FAST).json()["data"][0]["b64_json"])
    neg = _pixels(_gen(client, cfg_text_scale=4.0, negative_prompt="blurry, green", **FAST).json()["data"][0]["b64_json"])
    assert np.array_equal(plain, empty)
    assert np.abs(plain - neg).mean() > 1.0


def test_response_format_url_is_served_for_a_while(oai, server):
    res = oai.images.generate(prompt="a red square", size="32x32", response_format="url", extra_body={"seed": 5, **FAST})
    url = res.data[0].url
    assert url.startswith(server.base_url + "/v1/images/files/") and res.data[0].b64_json is None
    got = httpx.get(url, timeout=10)  # no API key: the URL is the key
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    with server.client(KEY) as c:
        inline = _gen(c, **FAST).json()["data"][0]["b64_json"]
    import base64

    assert got.content == base64.b64decode(inline)
    missing = httpx.get(server.base_url + "/v1/images/files/" + "0" * 32 + ".png", timeout=10)
    assert missing.status_code == 404


def test_chat_n_top_p_top_k_and_stop(oai, client):
    res = oai.chat.completions.create(model="bagel", messages=[{"role": "user", "content": "hello"}], n=3,
                                      temperature=1.0, top_p=0.9, extra_body={"top_k": 50}, max_tokens=6, seed=11)
    assert [c.index for c in res.choices] == [0, 1, 2]
    texts = [c.message.content for c in res.choices]
    # each choice k is the answer of seed 11 + k asked alone
    for k, text in enumerate(texts):
        alone = oai.chat.completions.create(model="bagel", messages=[{"role": "user", "content": "hello"}],
                                            temperature=1.0, top_p=0.9, extra_body={"top_k": 50}, max_tokens=6, seed=11 + k)
        assert alone.choices[0].message.content == text
    assert res.usage.completion_tokens == sum(
        oai.chat.completions.create(model="bagel", messages=[{"role": "user", "content": "hello"}], temperature=1.0,
                                    top_p=0.9, extra_body={"top_k": 50}, max_tokens=6, seed=11 + k).usage.completion_tokens
        for k in range(3))
    full = oai.chat.completions.create(model="bagel", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
    text = full.choices[0].message.content
    if len(text) >= 3:
        stop = text[2]
        cut = oai.chat.completions.create(model="bagel", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
                                          stop=[stop])
        assert cut.choices[0].message.content == text[:text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5})
    assert r.status_code == 400, r.text
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 2,
                                                  "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


def test_server_pngs_carry_their_metadata(client):
    import base64

    from bagel_engine.image_metadata import read_png_metadata

    b64 = _gen(client, negative_prompt="fog", **FAST).json()["data"][0]["b64_json"]
    meta = read_png_metadata(base64.b64decode(b64))
    assert meta["prompt"] == "a red square" and meta["seed"] == 5 and meta["task"] == "t2i"
    assert meta["negative_prompt"] == "fog" and meta["parameters"]["num_timesteps"] == 3
    # a picture drawn through chat says so too
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a green tree"}],
                                                  "modalities": ["image"], "seed": 9, **FAST})
    assert r.status_code == 200, r.text
    url = r.json()["choices"][0]["message"]["images"][0]["image_url"]["url"]
    meta = read_png_metadata(base64.b64decode(url.split(",", 1)[1]))
    assert (meta["task"], meta["prompt"], meta["seed"]) == ("t2i", "a green tree", 9)
