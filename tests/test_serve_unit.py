"""Unit tests of the server's parts, and error paths the real model cannot be driven into
(a job that crashes, an engine that rejects input after validation) with a small fake pipeline
behind a real uvicorn on loopback."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from bagel_engine.params import BagelInputError  # noqa: E402
from bagel_engine.serve import ServeSettings, create_app  # noqa: E402
from bagel_engine.serve.errors import APIError  # noqa: E402
from bagel_engine.serve.images import decode_image, read_image_ref  # noqa: E402
from bagel_engine.serve.metrics import Metrics  # noqa: E402
from bagel_engine.serve.tasks import Conversation, text_job  # noqa: E402
from bagel_engine.think_text import split_think  # noqa: E402
from bagel_engine.serve.worker import JobCancelled, ModelWorker, QueueFull  # noqa: E402
from test_serve_support import ThreadedServer, data_url, png_bytes  # noqa: E402


class FakePipe:
    """Same methods as BagelPipeline; prompts steer it: 'crash', 'reject', 'slow N'."""

    model_name = "fake-bagel"
    config = SimpleNamespace(latent_downsample=4, max_image_side=96)

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.steps_run = 0

    def _behave(self, prompt: str, callback) -> None:
        if prompt == "crash":
            raise RuntimeError("CUDA went sideways at 0x7f3a2c001000 in /opt/secret/build/kernel.cu")
        if prompt == "oom":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 275000000000 bytes. Error code 12 (Cannot allocate memory)")
        if prompt == "reject":
            raise BagelInputError("the engine says no: prompt too odd")
        if prompt.startswith("slow"):
            total = int(prompt.split()[1])
            for i in range(total):
                time.sleep(0.01)
                self.steps_run += 1
                if callback is not None:
                    callback(i + 1, total)

    def generate(self, prompt, *, height=1024, width=1024, think=False, seed=None, callback=None, **knobs):
        if not isinstance(prompt, str):  # several prompts drawn together: one output each
            return [self.generate(p, height=height, width=width, think=think, seed=seed, callback=callback, **knobs)
                    for p in prompt]
        self.calls.append(("generate", prompt, height, width, think, seed, knobs))
        self._behave(prompt, callback)
        return SimpleNamespace(text="plan" if think else None, image=Image.new("RGB", (width, height)),
                               seed=seed if seed is not None else 1, timings={"total_s": 0.0})

    def edit(self, images, prompt, *, think=False, seed=None, callback=None, **knobs):
        self.calls.append(("edit", prompt, images, knobs))
        self._behave(prompt, callback)
        last = images[-1] if isinstance(images, list) else images
        return SimpleNamespace(text=None, image=last.copy(), seed=seed or 1, timings={})

    def understand(self, images, question, **kw):
        self.calls.append(("understand", question, images, kw))
        self._behave(question, None)
        return SimpleNamespace(text="<think>look</think>a square", image=None, seed=1, timings={})

    def chat(self, prompt, **kw):
        self.calls.append(("chat", prompt, kw))
        self._behave(prompt, None)
        return SimpleNamespace(text="hi", image=None, seed=1, timings={})

    def interleave(self, inputs, **kw):
        self.calls.append(("interleave", inputs, kw))
        # as the real one: a picture unless an answer is asked for (understanding_output)
        picture = None if kw.get("understanding_output") else Image.new("RGB", tuple(kw.get("image_shapes", (64, 64)))[::-1])
        return SimpleNamespace(text="joined", image=picture, seed=1, timings={})


@pytest.fixture()
def fake():
    return FakePipe()


@pytest.fixture()
def served(fake):
    srv = ThreadedServer(create_app(fake, ServeSettings(queue_size=1)))
    yield srv, fake
    srv.stop()


# -- the worker ---------------------------------------------------------------------------------
def test_worker_bounds_the_queue_and_survives_failures():
    gate = threading.Event()
    worker = ModelWorker(object(), queue_size=1).start()
    try:
        running = worker.submit("t", lambda pipe, cb: gate.wait(5) and "first")
        time.sleep(0.05)
        waiting = worker.submit("t", lambda pipe, cb: "second")
        with pytest.raises(QueueFull) as e:
            worker.submit("t", lambda pipe, cb: "third")
        assert e.value.retry_after >= 1
        gate.set()
        assert running.future.result(5) == "first" and waiting.future.result(5) == "second"

        def boom(pipe, cb):
            raise ValueError("bad")

        with pytest.raises(ValueError):
            worker.submit("t", boom).future.result(5)
        assert worker.submit("t", lambda pipe, cb: 42).future.result(5) == 42
        text = worker.metrics.render()
        assert 'bagel_jobs_total{kind="t",outcome="error"} 1' in text
        assert "bagel_requests_rejected_total 1" in text
    finally:
        worker.stop()


def test_worker_cancels_between_steps_and_before_start():
    worker = ModelWorker(object(), queue_size=2).start()
    steps = []

    def long(pipe, cb):
        for i in range(1000):
            time.sleep(0.005)
            steps.append(i)
            cb(i + 1, 1000)

    try:
        job = worker.submit("long", long)
        queued = worker.submit("short", lambda pipe, cb: "never")
        queued.cancel()
        time.sleep(0.05)
        job.cancel()
        with pytest.raises(JobCancelled):
            job.future.result(5)
        assert len(steps) < 100 and job.step == len(steps)
        with pytest.raises(JobCancelled):
            queued.future.result(5)
    finally:
        worker.stop()


def test_queue_size_zero_takes_a_job_only_when_idle():
    gate = threading.Event()
    worker = ModelWorker(object(), queue_size=0).start()
    try:
        first = worker.submit("t", lambda pipe, cb: gate.wait(5))
        time.sleep(0.05)
        with pytest.raises(QueueFull):
            worker.submit("t", lambda pipe, cb: None)
        gate.set()
        first.future.result(5)
        time.sleep(0.05)
        worker.submit("t", lambda pipe, cb: None).future.result(5)
    finally:
        worker.stop()


# -- errors through the HTTP server --------------------------------------------------------------
def test_a_crashing_job_answers_500_and_the_server_stays_up(served):
    srv, fake = served
    with httpx.Client(base_url=srv.base_url, timeout=10) as c:
        r = c.post("/v1/images/generations", json={"prompt": "crash", "size": "32x32"})
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "server_error" and err["code"] == "internal_error"
        assert "RuntimeError" in err["message"] and "incident" in err["message"]
        for secret in ("sideways", "0x7f3a", "/opt/secret"):  # the log has the detail, the client does not
            assert secret not in err["message"]
        r = c.post("/v1/images/generations", json={"prompt": "oom", "size": "32x32"})
        err = r.json()["error"]
        assert r.status_code == 500 and err["code"] == "out_of_memory" and "more memory" in err["message"]
        assert "Allocator" not in err["message"] and "275000000000" not in err["message"]
        r = c.post("/v1/images/generations", json={"prompt": "reject", "size": "32x32"})
        assert r.status_code == 400 and "the engine says no" in r.json()["error"]["message"]
        assert c.get("/health").json()["status"] == "ok"
        r = c.post("/v1/images/generations", json={"prompt": "fine", "size": "32x32"})
        assert r.status_code == 200
        metrics = c.get("/metrics").text
        assert 'bagel_jobs_total{kind="generate",outcome="error"} 2' in metrics
        assert 'bagel_jobs_total{kind="generate",outcome="bad_input"} 1' in metrics


def test_knobs_reach_the_engine_by_their_official_names(served):
    srv, fake = served
    body = {"prompt": "p", "size": "64x32", "seed": 3, "think": True, "cfg_text_scale": 5.5, "cfg_img_scale": 1.0,
            "cfg_interval": [0.3, 0.9], "cfg_renorm_type": "text_channel", "cfg_renorm_min": 0.2,
            "timestep_shift": 2.5, "num_timesteps": 7, "max_think_token_n": 9, "do_sample": True,
            "text_temperature": 0.7}
    with httpx.Client(base_url=srv.base_url, timeout=10) as c:
        r = c.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    name, prompt, height, width, think, seed, knobs = fake.calls[-1]
    assert (name, prompt, height, width, think, seed) == ("generate", "p", 32, 64, True, 3)
    assert knobs == {"cfg_text_scale": 5.5, "cfg_img_scale": 1.0, "cfg_interval": (0.3, 0.9),
                     "cfg_renorm_type": "text_channel", "cfg_renorm_min": 0.2, "timestep_shift": 2.5,
                     "num_timesteps": 7, "max_think_token_n": 9, "do_sample": True, "text_temperature": 0.7}
    assert r.json()["data"][0]["revised_prompt"] == "plan"


def test_chat_routes_to_the_right_engine_call(served):
    srv, fake = served
    img = data_url(png_bytes())
    with httpx.Client(base_url=srv.base_url, timeout=10) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": img}}]}],
            "think": True, "temperature": 0.5, "max_completion_tokens": 12})
        assert r.status_code == 200, r.text
        msg = r.json()["choices"][0]["message"]
        assert msg["content"] == "a square" and msg["reasoning_content"] == "look"
        name, question, images, kw = fake.calls[-1]
        assert name == "understand" and question == "what?" and isinstance(images, Image.Image)
        assert callable(kw.pop("callback"))  # the worker's: a cancelled job stops between two tokens
        assert kw == {"think": True, "seed": None, "do_sample": True, "text_temperature": 0.5, "max_new_tokens": 12}
        r = c.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"}]})
        assert r.status_code == 200 and fake.calls[-1][0] == "interleave"
        assert fake.calls[-1][1] == ["one", "two", "three"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "draw"}],
                                                 "modalities": ["image"], "size": "32x32", "max_tokens": 5})
        assert r.status_code == 200
        assert fake.calls[-1][0] == "generate" and fake.calls[-1][6] == {"max_think_token_n": 5}


def test_a_disconnected_clients_job_stops(served):
    srv, fake = served
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.base_url + "/v1/images/generations", json={"prompt": "slow 2000", "size": "32x32"},
                   timeout=httpx.Timeout(10, read=0.3))
    time.sleep(0.5)
    ran = fake.steps_run
    time.sleep(0.3)
    assert fake.steps_run == ran < 200  # stopped, long before its 2000 steps


def test_engine_api_is_the_only_thing_called(fake):
    # the job functions only touch generate / edit / understand / chat / interleave
    job = text_job(Conversation(["hello"]), think=False, seed=None, text_kw={"max_new_tokens": 3})
    callback = lambda s, t: None  # noqa: E731
    assert job(fake, callback).text == "hi"
    assert fake.calls == [("chat", "hello", {"think": False, "seed": None, "callback": callback, "max_new_tokens": 3})]


# -- image references -----------------------------------------------------------------------------
def test_image_references_follow_the_allow_flags(tmp_path):
    png = png_bytes(8, 8)
    (tmp_path / "ok.png").write_bytes(png)
    closed = ServeSettings()
    assert read_image_ref(data_url(png), closed, "image").size == (8, 8)
    for ref, word in ((str(tmp_path / "ok.png"), "--allow-local-paths"), ("file:///etc/hosts", "--allow-local-paths"),
                      ("https://example.com/a.png", "--allow-remote-urls"), ("ftp://x/y.png", "scheme")):
        with pytest.raises(APIError, match=word):
            read_image_ref(ref, closed, "image")
    opened = ServeSettings(allow_local_paths=[tmp_path])
    assert read_image_ref(str(tmp_path / "ok.png"), opened, "image").size == (8, 8)
    assert read_image_ref((tmp_path / "ok.png").as_uri(), opened, "image").size == (8, 8)
    with pytest.raises(APIError, match="outside"):
        read_image_ref(str(tmp_path / ".." / "elsewhere.png"), opened, "image")
    with pytest.raises(APIError, match="outside"):
        (tmp_path / "link.png").symlink_to("/etc/hosts")
        read_image_ref(str(tmp_path / "link.png"), opened, "image")


def test_remote_urls_only_with_the_flag(fake):
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    png = png_bytes(12, 8)

    async def image(request):
        return Response(png, media_type="image/png")

    host = ThreadedServer(Starlette(routes=[Route("/a.png", image)]))
    try:
        url = host.base_url + "/a.png"
        assert read_image_ref(url, ServeSettings(allow_remote_urls=True), "image").size == (12, 8)
        with pytest.raises(APIError, match="--allow-remote-urls"):
            read_image_ref(url, ServeSettings(), "image")
        with pytest.raises(APIError, match="could not download"):
            read_image_ref(host.base_url + "/missing.png", ServeSettings(allow_remote_urls=True), "image")
    finally:
        host.stop()


def test_decode_image_limits():
    s = ServeSettings(max_image_pixels=100)
    with pytest.raises(APIError, match="above the limit of 100"):
        decode_image(png_bytes(20, 20), s, "image")
    with pytest.raises(APIError, match="could not be decoded") as e:
        decode_image(png_bytes()[:50], ServeSettings(), "image")
    with pytest.raises(APIError, match="is not an image") as e:
        decode_image(b"not an image at all", ServeSettings(), "image")
    assert "0x" not in e.value.message and "object at" not in e.value.message  # PIL names a BytesIO by address


def test_public_text_scrubs_addresses_and_exception_paths():
    from bagel_engine.serve.errors import public_text

    text = "cannot identify image file <_io.BytesIO object at 0x7f1234abcd> read from /srv/data/in.png at 0xdeadbeef12"
    assert public_text(text) == "cannot identify image file <data> read from /srv/data/in.png at 0x…"
    assert public_text(text, paths=True) == "cannot identify image file <data> read from <path> at 0x…"
    assert public_text("size 32x32, ratio 1/2, see https://example.com/a/b") == \
        "size 32x32, ratio 1/2, see https://example.com/a/b"
    with pytest.raises(APIError, match="empty"):
        decode_image(b"", ServeSettings(), "image")


# -- small pieces ---------------------------------------------------------------------------------
def test_split_think():
    assert split_think("<think>plan it</think> the answer") == ("plan it", "the answer")
    assert split_think("<think>cut sho") == ("cut sho", "")
    assert split_think("no tags") == (None, "no tags")


def test_conversation_layout():
    img = Image.new("RGB", (4, 4))
    conv = Conversation([img, img, "q"])
    assert conv.simple() == ([img, img], "q")
    assert Conversation(["a", img, "b"]).simple() is None


def test_metrics_text():
    m = Metrics()
    m.inc("bagel_requests_total", endpoint="/x", status="200")
    m.observe("bagel_job_duration_seconds", 0.3, kind="generate")
    m.gauge("bagel_queue_depth", "depth", lambda: 2)
    text = m.render()
    assert 'bagel_requests_total{endpoint="/x",status="200"} 1' in text
    assert 'bagel_job_duration_seconds_bucket{kind="generate",le="0.25"} 0' in text
    assert 'bagel_job_duration_seconds_bucket{kind="generate",le="0.5"} 1' in text
    assert "# TYPE bagel_queue_depth gauge\nbagel_queue_depth 2" in text


def test_cli_lists_the_flags():
    from typer.testing import CliRunner

    from bagel_engine.cli import serve_cmd  # noqa: F401 - registers the commands
    from bagel_engine.cli.main import app

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output
    for flag in ("--model", "--host", "--port", "--api-key", "BAGEL_API_KEY", "--queue-size", "--max-body-mb",
                 "--max-image-pixels", "--max-images", "--allow-local-paths", "--allow-remote-urls", "--no-ui"):
        assert flag in out, flag
    out = CliRunner().invoke(app, ["ui", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output
    assert "--model" in out and "--port" in out


def test_the_real_pipeline_and_the_fake_meet_the_front_ends_protocol():
    import bagel_engine
    from bagel_engine.engine_protocol import Pipeline
    from golden import MODEL_DIR

    assert isinstance(bagel_engine.load(MODEL_DIR, device="cpu"), Pipeline)
    assert isinstance(FakePipe(), Pipeline)
    assert not isinstance(object(), Pipeline)
