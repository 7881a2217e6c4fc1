"""Reading images from requests (with limits) and encoding images into responses.

By default a request may carry images only as ``data:`` URLs or multipart uploads: the server
never opens a local path or fetches a remote URL unless it was started with
``--allow-local-paths DIR`` (files under DIR only) or ``--allow-remote-urls``.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from bagel_engine.image_metadata import encode_image as encode_image_as

from .errors import APIError, bad_request, public_text
from .settings import ServeSettings

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)
FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}


def decode_image(data: bytes, settings: ServeSettings, what: str) -> Image.Image:
    """Open ``data`` as an image, refusing corrupt files and images above the pixel limit."""
    if not data:
        raise bad_request(f"{what} is empty", param=what, code="invalid_image")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > settings.max_image_pixels:
            raise _too_large(what, w, h, settings)
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
    except APIError:
        raise
    except Image.DecompressionBombError:
        raise bad_request(f"{what} has more pixels than the limit of {settings.max_image_pixels} per image "
                          "(server flag --max-image-pixels)", param=what, code="image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError) as e:
        detail = public_text(str(e), paths=True)
        raise bad_request(f"{what} could not be read as an image ({type(e).__name__}: {detail})", param=what,
                          code="invalid_image") from None
    return img


def _too_large(what: str, w: int, h: int, settings: ServeSettings) -> APIError:
    return bad_request(
        f"{what} is {w}x{h} = {w * h} pixels, above the limit of {settings.max_image_pixels} pixels per image "
        "(server flag --max-image-pixels)",
        param=what,
        code="image_too_large",
    )


def read_image_ref(ref: str, settings: ServeSettings, what: str) -> Image.Image:
    """An image given by reference in JSON: a data: URL, or (when allowed) a local file or a URL."""
    ref = ref.strip()
    if ref[:5].lower() == "data:":
        return decode_image(_decode_data_url(ref, what), settings, what)
    scheme = urllib.parse.urlsplit(ref).scheme.lower()
    if scheme in ("http", "https"):
        if not settings.allow_remote_urls:
            raise bad_request(
                f"{what}: this server does not fetch remote URLs; send the image inline as a data: URL "
                "(data:image/png;base64,...) or upload it, or start the server with --allow-remote-urls",
                param=what,
                code="remote_urls_disabled",
            )
        return decode_image(_fetch(ref, settings, what), settings, what)
    if scheme == "file" or scheme == "" or (len(scheme) == 1 and ref[1:2] == ":"):
        if not settings.allow_local_paths:
            raise bad_request(
                f"{what}: this server does not read local files named in requests; send the image inline as "
                "a data: URL or upload it, or start the server with --allow-local-paths DIR",
                param=what,
                code="local_paths_disabled",
            )
        return decode_image(_read_local(ref, settings, what), settings, what)
    raise bad_request(f"{what}: unsupported image reference scheme {scheme!r}; use a data: URL", param=what)


def _decode_data_url(ref: str, what: str) -> bytes:
    m = _DATA_URL.match(ref)
    if not m:
        raise bad_request(f"{what} is not a valid data: URL (expected data:image/<type>;base64,<data>)", param=what,
                          code="invalid_image")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        raise bad_request(f"{what}: a data: URL of type {mime!r} is not an image", param=what, code="invalid_image")
    payload = ref[m.end():]
    if not m.group("b64"):
        return urllib.parse.unquote_to_bytes(payload)
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{what}: the data: URL holds invalid base64", param=what, code="invalid_image") from None


def _read_local(ref: str, settings: ServeSettings, what: str) -> bytes:
    path_text = urllib.parse.unquote(urllib.parse.urlsplit(ref).path) if ref.lower().startswith("file:") else ref
    path = Path(path_text).expanduser()
    try:
        resolved = path.resolve()  # follows symbolic links: a link out of the allowed tree is outside
    except (OSError, RuntimeError):
        raise bad_request(f"{what}: cannot resolve {path_text!r}", param=what, code="invalid_image") from None
    # Containment first, so a request cannot probe which files exist elsewhere.
    if not any(resolved == root or root in resolved.parents for root in settings.allow_local_paths):
        raise bad_request(f"{what}: {path_text!r} is outside the directories this server may read "
                          "(--allow-local-paths)", param=what, code="local_path_not_allowed")
    if not resolved.is_file():
        raise bad_request(f"{what}: no readable file at {path_text!r}", param=what, code="invalid_image")
    if resolved.stat().st_size > settings.max_body_bytes:
        raise bad_request(f"{what}: {path_text!r} is larger than {settings.max_body_bytes} bytes", param=what,
                          code="image_too_large")
    return resolved.read_bytes()


def _fetch(url: str, settings: ServeSettings, what: str) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "bagel-engine"})
    try:
        with urllib.request.urlopen(req, timeout=settings.remote_timeout_s) as resp:  # noqa: S310 - opt-in flag
            data = resp.read(settings.max_body_bytes + 1)
    except Exception as e:  # noqa: BLE001 - any network failure is the request's problem
        raise bad_request(f"{what}: could not fetch {url} ({type(e).__name__}: {e})", param=what,
                          code="fetch_failed") from None
    if len(data) > settings.max_body_bytes:
        raise bad_request(f"{what}: {url} is larger than {settings.max_body_bytes} bytes", param=what,
                          code="image_too_large")
    return data


def encode_image_bytes(img: Image.Image, output_format: str = "png", meta: dict | None = None) -> bytes:
    """``img`` encoded as ``output_format`` (png, jpeg, webp); a PNG carries ``meta`` (prompt, seed, knobs,
    model) in its text chunks."""
    return encode_image_as(img, FORMATS[output_format][0], meta)


def encode_image(img: Image.Image, output_format: str = "png", meta: dict | None = None) -> str:
    """Base64 of ``img`` in ``output_format`` (png, jpeg, webp)."""
    return base64.b64encode(encode_image_bytes(img, output_format, meta)).decode("ascii")


def data_url(img: Image.Image, output_format: str = "png", meta: dict | None = None) -> str:
    return f"data:{FORMATS[output_format][1]};base64,{encode_image(img, output_format, meta)}"
