"""Property-based test of the server's request schemas (hypothesis): random JSON bodies, raw bytes and
multipart forms, built around the real field names, never get a 5xx or hang, every 4xx says what is wrong,
and the server keeps answering. A small fake pipeline stands behind a real uvicorn on loopback so that the
examples run fast; what the model does with valid input is tested elsewhere."""

from __future__ import annotations

import json
import string

import httpx
import pytest

pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bagel_engine.serve import ServeSettings, create_app  # noqa: E402
from test_serve_support import ThreadedServer, data_url, png_bytes  # noqa: E402
from test_serve_unit import FakePipe  # noqa: E402

KNOBS = ["think", "seed", "cfg_text_scale", "cfg_img_scale", "cfg_interval", "cfg_renorm_type", "cfg_renorm_min",
         "timestep_shift", "num_timesteps", "max_think_token_n", "do_sample", "text_temperature"]
FIELDS = {
    "/v1/images/generations": ["prompt", "model", "n", "size", "response_format", "output_format", "user", *KNOBS],
    "/v1/images/edits": ["prompt", "image", "model", "n", "size", "response_format", "output_format", *KNOBS],
    "/v1/chat/completions": ["messages", "model", "modalities", "max_tokens", "max_completion_tokens",
                             "max_new_tokens", "temperature", "n", "stream", "size", "output_format", *KNOBS],
}
SMALL_PNG = data_url(png_bytes(8, 8))

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["auto", "32x32", "0x0", "99999x99999", "-1x5", "64x", "png", "webp", "b64_json", "url",
                     "global", "channel", "text", "image", "user", "assistant", "system", SMALL_PNG,
                     "data:image/png;base64,!!!", "file:///etc/passwd", "http://127.0.0.1:1/x.png", ""]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=12)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=30), values)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(
        st.fixed_dictionaries({"url": st.sampled_from([SMALL_PNG, "data:image/png;base64,AAAA", "nope"])}), values)}),
    values,
)
messages = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system", "developer", "tool", ""]),
    "content": st.one_of(st.text(max_size=30), st.lists(parts, max_size=3), values)}), max_size=3)


unit = st.floats(min_value=0, max_value=1)
PLAUSIBLE = {  # values a client would send, so that many examples get past validation and into the job
    "prompt": st.text(min_size=1, max_size=30), "n": st.integers(1, 3), "size": st.sampled_from(["32x32", "16x48", "auto"]),
    "seed": st.integers(0, 2**40), "think": st.booleans(), "cfg_text_scale": st.floats(0, 8),
    "cfg_img_scale": st.floats(0, 3), "cfg_interval": st.lists(unit, min_size=2, max_size=2).map(sorted),
    "cfg_renorm_type": st.sampled_from(["global", "channel", "text_channel"]), "cfg_renorm_min": unit,
    "timestep_shift": st.floats(0.5, 4), "num_timesteps": st.integers(2, 5), "max_think_token_n": st.integers(1, 8),
    "do_sample": st.booleans(), "text_temperature": st.floats(0.1, 2), "max_tokens": st.integers(1, 8),
    "output_format": st.sampled_from(["png", "jpeg", "webp"]), "modalities": st.sampled_from([["text"], ["image"]]),
    "image": st.one_of(st.just(SMALL_PNG), st.lists(st.just(SMALL_PNG), min_size=1, max_size=3)),
    "messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(
        st.text(max_size=20), st.lists(parts, min_size=1, max_size=2))}), min_size=1, max_size=2),
}
REQUIRED = {"/v1/images/generations": ["prompt"], "/v1/images/edits": ["prompt", "image"],
            "/v1/chat/completions": ["messages"]}


@st.composite
def bodies(draw):
    path = draw(st.sampled_from(sorted(FIELDS)))
    names = draw(st.lists(st.sampled_from(FIELDS[path]), max_size=6, unique=True))
    if draw(st.integers(0, 3)):  # mostly with the required fields
        names = list(dict.fromkeys(REQUIRED[path] + names))
    body = {}
    for name in names:
        wild = name not in PLAUSIBLE or draw(st.integers(0, 11)) == 0  # one field in twelve gets any JSON at all
        if wild:
            body[name] = draw(messages if name == "messages" and draw(st.booleans()) else values)
        else:
            body[name] = draw(PLAUSIBLE[name])
    if not draw(st.integers(0, 3)):  # an unknown field
        body[draw(st.text(string.ascii_lowercase, min_size=1, max_size=8))] = draw(values)
    top = draw(st.one_of(st.just(body), st.just(body), st.just(body), st.just(body), values))
    return path, top


@pytest.fixture(scope="module")
def server():
    srv = ThreadedServer(create_app(FakePipe(), ServeSettings(queue_size=4, max_image_pixels=256 * 256)))
    yield srv
    srv.stop()


def _check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"], r.text


FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@FUZZ
@given(case=bodies())
def test_random_json_bodies_never_get_a_5xx(server, case):
    path, body = case
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        _check(c.post(path, content=json.dumps(body, allow_nan=True).encode(),
                      headers={"content-type": "application/json"}))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300), path=st.sampled_from(sorted(FIELDS)),
       ctype=st.sampled_from(["application/json", "text/plain", "multipart/form-data", "multipart/form-data; boundary=x",
                              "application/x-www-form-urlencoded", ""]))
def test_random_bytes_never_get_a_5xx(server, raw, path, ctype):
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        _check(c.post(path, content=raw, headers={"content-type": ctype} if ctype else {}))


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(st.sampled_from(FIELDS["/v1/images/edits"] + ["image[]", "mask", "x"]),
                              st.one_of(st.text(max_size=20), st.sampled_from(["2", "-1", "auto", "[0.1, 0.9]",
                                                                               "true", "nan", "1e999"])), max_size=6),
       files=st.lists(st.one_of(st.binary(max_size=200), st.just(png_bytes(8, 8)), st.just(png_bytes(300, 300))),
                      max_size=3),
       file_field=st.sampled_from(["image", "image[]", "mask", "other"]))
def test_random_multipart_edit_forms_never_get_a_5xx(server, fields, files, file_field):
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        upload = [(file_field, (f"f{i}.png", data, "image/png")) for i, data in enumerate(files)]
        _check(c.post("/v1/images/edits", data=fields, files=upload or None))
        assert c.get("/health").status_code == 200
