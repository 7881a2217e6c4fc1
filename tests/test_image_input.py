"""One image-input module for every front end: the trusted policy (CLI, batch, trainer, API) reads what the
user names; the server's policy reads data: URLs only unless told, under its limits; errors say why."""

from __future__ import annotations

import base64
import io
import os

import pytest
from PIL import Image

from bagel_engine import image_input
from bagel_engine.image_input import TRUSTED, ImageInputError, ImagePolicy, read_image
from bagel_engine.params import BagelInputError


def png(w=8, h=6, color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_every_kind_of_reference_gives_the_same_picture(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    refs = [png(), bytearray(png()), {"bytes": png()}, {"path": str(tmp_path / "a.png")}, data_url(png()),
            str(tmp_path / "a.png"), tmp_path / "a.png", (tmp_path / "a.png").as_uri(), "a.png"]
    for ref in refs:
        img = read_image(ref, TRUSTED.relative_to(tmp_path))
        assert img.size == (8, 6) and img.convert("RGB").getpixel((0, 0)) == (200, 10, 10), ref


@pytest.mark.parametrize("ref, words, code", [
    ("missing.png", ["'missing.png' not found", "looked at"], "invalid_image"),
    ("empty.png", ["is empty"], "invalid_image"),
    ("text.png", ["is not an image"], "invalid_image"),
    ("trunc.png", ["could not be decoded", "truncated"], "invalid_image"),
    (".", ["is a directory"], "invalid_image"),
    ("data:image/png;base64,@@@", ["invalid base64"], "invalid_image"),
    ("data:text/plain;base64,aGk=", ["is not an image"], "invalid_image"),
    ("ftp://host/a.png", ["scheme 'ftp'"], "invalid_value"),
    ({"neither": 1}, ["neither 'bytes' nor 'path'"], "invalid_image"),
    (3.5, ["got float"], "invalid_image"),
])
def test_a_bad_image_says_which_and_why(tmp_path, ref, words, code):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a picture at all")
    (tmp_path / "trunc.png").write_bytes(png(64, 64)[:90])
    with pytest.raises(ImageInputError) as e:
        read_image(ref, TRUSTED.relative_to(tmp_path), f"image 2 {image_input.describe(ref)!r}")
    assert isinstance(e.value, BagelInputError) and e.value.code == code
    assert str(e.value).startswith("image 2") and all(w in str(e.value) for w in words), str(e.value)


def server(tmp_path, **kw) -> ImagePolicy:
    args = dict(local_roots=[], allow_remote=False, max_pixels=1000, max_bytes=10_000, timeout_s=1.0,
                hints={"remote_urls_disabled": " (flag --allow-remote-urls)"}) | kw
    return ImagePolicy.for_server(**args)


def test_the_server_policy_reads_only_what_it_was_allowed(tmp_path):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir(), other.mkdir()
    (allowed / "ok.png").write_bytes(png())
    (other / "secret.png").write_bytes(png())
    assert read_image(data_url(png()), server(tmp_path)).size == (8, 6)
    for ref, code in ((str(allowed / "ok.png"), "local_paths_disabled"), ("file:///etc/hosts", "local_paths_disabled"),
                      ("https://example.com/a.png", "remote_urls_disabled")):
        with pytest.raises(ImageInputError) as e:
            read_image(ref, server(tmp_path))
        assert e.value.code == code
    assert "(flag --allow-remote-urls)" in str(e.value)  # the policy's hint for that refusal
    policy = server(tmp_path, local_roots=[allowed])
    assert read_image(str(allowed / "ok.png"), policy).size == (8, 6)
    os.symlink(other / "secret.png", allowed / "link.png")  # a link out of the tree is outside it
    for ref in (str(other / "secret.png"), str(allowed / "link.png"), str(allowed / ".." / "other" / "secret.png")):
        with pytest.raises(ImageInputError) as e:
            read_image(ref, policy)
        assert e.value.code == "local_path_not_allowed"
    with pytest.raises(ImageInputError) as e:  # a missing file inside the tree: no server path in the message
        read_image(str(allowed / "nope.png"), policy)
    assert "not found" in str(e.value) and "looked at" not in str(e.value)


def test_limits_on_pixels_and_bytes(tmp_path):
    with pytest.raises(ImageInputError) as e:
        read_image(png(50, 50), server(tmp_path))
    assert e.value.code == "image_too_large" and "50x50 = 2500 pixels" in str(e.value)
    big = tmp_path / "big.png"
    big.write_bytes(png(20, 20) + b"\0" * 20_000)
    with pytest.raises(ImageInputError, match="larger than 10000 bytes") as e:
        read_image(str(big), server(tmp_path, local_roots=[tmp_path]))
    assert e.value.code == "image_too_large"
    assert read_image(png(50, 50)).size == (50, 50)  # the trusted policy has no pixel limit of its own


def test_describe_cuts_data_urls_short():
    assert image_input.describe(data_url(png())).endswith("...") and len(image_input.describe(data_url(png()))) == 43
    assert image_input.describe({"bytes": b"abc"}) == "<3 bytes>" and image_input.describe(" a.png ") == "a.png"


def test_odd_names_and_files(tmp_path):
    (tmp_path / "cat:v2.png").write_bytes(png())  # a colon in a file name is a path, not a URL scheme
    assert read_image("cat:v2.png", TRUSTED.relative_to(tmp_path)).size == (8, 6)
    os.mkfifo(tmp_path / "pipe.png")  # would block a reader forever
    with pytest.raises(ImageInputError, match="not a regular file"):
        read_image(str(tmp_path / "pipe.png"))
    b64 = base64.b64encode(png()).decode()
    wrapped = "data:image/png;base64," + "\n".join(b64[i:i + 40] for i in range(0, len(b64), 40))
    assert read_image(wrapped).size == (8, 6)  # the user's own file: line-wrapped base64 is fine
    with pytest.raises(ImageInputError, match="invalid base64"):
        read_image(wrapped, server(tmp_path))  # a server is strict
