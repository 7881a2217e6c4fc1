"""Reading input images: one module, one set of rules, a policy per front end.

Every front end reads the images it is given here: the Python API (``check_image``), the CLI, batch
jobs and the trainer (``read_image`` with ``TRUSTED``: the user's own files, paths relative to the
input file, URLs fetched) and the server and the web UI (``ImagePolicy.for_server``: data: URLs and
uploads only unless the server was started with ``--allow-local-paths DIR`` / ``--allow-remote-urls``,
and a pixel limit).

An image may be given as a PIL image, encoded bytes, a record ``{"bytes": ..., "path": ...}`` (parquet
files), a ``data:`` URL, an ``http(s)://`` or ``file://`` URL, or a path. A bad one raises
:class:`ImageInputError` (a ``BagelInputError``) that names the image and says why, with a ``code``
the server reports (``invalid_image``, ``image_too_large``, ``remote_urls_disabled``, ...).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import stat
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from bagel_engine.params import BagelInputError

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


class ImageInputError(BagelInputError):
    """An input image that cannot be used; ``code`` says which rule it broke (the server's error code)."""

    def __init__(self, message: str, code: str = "invalid_image"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImagePolicy:
    """What an image reference may name, and how large an image may be.

    ``local_roots``: None, any local path; a tuple, only files under those directories (empty: none).
    ``base_dir``: where relative paths are resolved (None: the working directory).
    ``max_pixels``: None keeps PIL's own decompression-bomb limit. ``max_bytes``: a file or download cap.
    ``hints``: a sentence per error code appended to the message (the server names its flags there).
    """

    local_roots: tuple[Path, ...] | None = None
    base_dir: Path | None = None
    allow_remote: bool = True
    max_pixels: int | None = None
    max_bytes: int | None = None
    timeout_s: float = 60.0
    hints: tuple[tuple[str, str], ...] = ()
    show_paths: bool = True  # name the local path looked at in errors (False: the server's messages)
    lenient: bool = True  # the user's own files: base64 with line breaks decodes (the server's is strict)

    def relative_to(self, base_dir: Path) -> "ImagePolicy":
        return replace(self, base_dir=Path(base_dir))

    @classmethod
    def for_server(cls, local_roots, allow_remote: bool, max_pixels: int, max_bytes: int, timeout_s: float,
                   hints: dict[str, str] | None = None) -> "ImagePolicy":
        return cls(local_roots=tuple(Path(p).resolve() for p in local_roots), allow_remote=allow_remote,
                   max_pixels=max_pixels, max_bytes=max_bytes, timeout_s=timeout_s,
                   hints=tuple((hints or {}).items()), show_paths=False, lenient=False)

    def error(self, message: str, code: str = "invalid_image") -> ImageInputError:
        hint = dict(self.hints).get(code)
        return ImageInputError(f"{message}{hint}" if hint else message, code)


TRUSTED = ImagePolicy()  # the user's own files: CLI, batch jobs, the trainer, the Python API


def describe(value: Any) -> str:
    """A short name of an image reference for messages and manifests (a data: URL is cut short)."""
    if isinstance(value, Image.Image):
        return f"<{value.width}x{value.height} image>"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return str(value.get("path") or f"<{len(value.get('bytes') or b'')} bytes>")
    text = str(value).strip()
    return text if not text.startswith("data:") else text[:40] + "..."


def read_image(value: Any, policy: ImagePolicy = TRUSTED, what: str = "image") -> Image.Image:
    """A fully decoded image from any reference the policy allows, or :class:`ImageInputError`."""
    if isinstance(value, Image.Image):
        return value
    return decode_image(image_bytes(value, policy, what), policy, what)


def image_bytes(value: Any, policy: ImagePolicy = TRUSTED, what: str = "image") -> bytes:
    """The encoded image that one reference points at (read, decoded from base64 or downloaded)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if not value.get("path"):
            raise policy.error(f"{what}: the image record has neither 'bytes' nor 'path'")
        value = value["path"]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Path):
        return _read_local(str(value), policy, what)
    if not isinstance(value, str):
        raise policy.error(f"{what}: expected an image path, URL or bytes, got {type(value).__name__}")
    ref = value.strip()
    if ref[:5].lower() == "data:":
        return _decode_data_url(ref, policy, what)
    scheme = urllib.parse.urlsplit(ref).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise policy.error(f"{what}: remote URLs are not fetched here", "remote_urls_disabled")
        return _fetch(ref, policy, what)
    if scheme and scheme != "file" and "://" in ref:  # ftp://, s3://, ...: a URL this module does not fetch
        raise policy.error(f"{what}: unsupported image reference scheme {scheme!r}; use a path or a data: URL",
                           "invalid_value")
    return _read_local(ref, policy, what)  # a path: C:\..., cat:v2.png and file:// URLs included


def decode_image(data: bytes, policy: ImagePolicy = TRUSTED, what: str = "image") -> Image.Image:
    """Open ``data`` as an image (its first frame), refusing empty or corrupt data and images above the
    pixel limit."""
    if not data:
        raise policy.error(f"{what} is empty")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if policy.max_pixels is not None and w * h > policy.max_pixels:
            raise policy.error(f"{what} is {w}x{h} = {w * h} pixels, above the limit of {policy.max_pixels} "
                               "pixels per image", "image_too_large")
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
    except ImageInputError:
        raise
    except Image.DecompressionBombError as e:
        raise policy.error(f"{what} has too many pixels to decode safely ({e})", "image_too_large") from None
    except UnidentifiedImageError:
        raise policy.error(f"{what} is not an image (unknown format, corrupt or not an image file)") from None
    except Exception as e:  # noqa: BLE001 - PIL's plugins raise many kinds (struct.error, ZeroDivisionError...)
        raise policy.error(f"{what} could not be decoded as an image, corrupt or truncated? "
                           f"({type(e).__name__}: {_public(str(e))})") from None
    return img


def _public(text: str) -> str:
    """An exception's text without the local paths, object reprs and memory addresses it may carry (it can go
    back to a remote client)."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<data>", text)
    text = re.sub(r"0x[0-9a-fA-F]{6,}", "0x…", text)
    return re.sub(r"(?:[A-Za-z]:)?[/\\][^\s'\"]+", "<path>", text)[:200]


def _decode_data_url(ref: str, policy: ImagePolicy, what: str) -> bytes:
    m = _DATA_URL.match(ref)
    if not m:
        raise policy.error(f"{what} is not a valid data: URL (expected data:image/<type>;base64,<data>)")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        raise policy.error(f"{what}: a data: URL of type {mime!r} is not an image")
    payload = ref[m.end():]
    if not m.group("b64"):
        return urllib.parse.unquote_to_bytes(payload)
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        if policy.lenient:  # line-wrapped base64 in a user's own file
            try:
                return base64.b64decode("".join(payload.split()), validate=True)
            except (binascii.Error, ValueError):
                pass
        raise policy.error(f"{what}: the data: URL holds invalid base64") from None


def _read_local(ref: str, policy: ImagePolicy, what: str) -> bytes:
    if policy.local_roots is not None and not policy.local_roots:
        raise policy.error(f"{what}: local files named in a request are not read here", "local_paths_disabled")
    text = urllib.parse.unquote(urllib.parse.urlsplit(ref).path) if ref[:5].lower() == "file:" else ref
    path = Path(text).expanduser()
    if not path.is_absolute() and policy.base_dir is not None:
        path = policy.base_dir / path
    if policy.local_roots is not None:
        try:
            resolved = path.resolve()  # follows symbolic links: a link out of the allowed tree is outside
        except (OSError, RuntimeError):
            raise policy.error(f"{what}: cannot resolve {text!r}") from None
        # containment first, so a request cannot probe which files exist elsewhere
        if not any(resolved == root or root in resolved.parents for root in policy.local_roots):
            raise policy.error(f"{what}: {text!r} is outside the directories that may be read",
                               "local_path_not_allowed")
        path = resolved
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(str(path))
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
            raise policy.error(f"{what} is not a regular file")
        if policy.max_bytes is not None and st.st_size > policy.max_bytes:
            raise policy.error(f"{what}: {text!r} is larger than {policy.max_bytes} bytes", "image_too_large")
        return path.read_bytes()
    except FileNotFoundError:
        where = f" (looked at {path.absolute()})" if policy.show_paths else ""  # a server keeps its paths
        raise policy.error(f"{what} not found{where}") from None
    except IsADirectoryError:
        raise policy.error(f"{what} is a directory, not an image file") from None
    except OSError as e:
        raise policy.error(f"{what} cannot be read: {e.strerror or e}") from None


def _fetch(url: str, policy: ImagePolicy, what: str) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "bagel-engine"})
    limit = policy.max_bytes
    try:
        with urllib.request.urlopen(req, timeout=policy.timeout_s) as resp:  # noqa: S310 - allowed by the policy
            data = resp.read() if limit is None else resp.read(limit + 1)
    except Exception as e:  # noqa: BLE001 - any network failure is the input's problem
        raise policy.error(f"{what}: could not download {url} ({type(e).__name__}: {e})", "fetch_failed") from None
    if limit is not None and len(data) > limit:
        raise policy.error(f"{what}: {url} is larger than {limit} bytes", "image_too_large")
    return data
