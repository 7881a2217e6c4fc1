"""Reading images from requests (``bagel_engine.image_input`` under the server's policy) and encoding
images into responses.

By default a request may carry images only as ``data:`` URLs or multipart uploads: the server
never opens a local path or fetches a remote URL unless it was started with
``--allow-local-paths DIR`` (files under DIR only) or ``--allow-remote-urls``.
"""

from __future__ import annotations

import base64

from PIL import Image

from bagel_engine import image_input
from bagel_engine.image_input import ImageInputError, ImagePolicy
from bagel_engine.image_metadata import encode_image as encode_image_as

from .errors import bad_request, public_text
from .settings import ServeSettings

FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}


# What the server's messages add to each refusal: the flag that would allow it, or how to send the image.
_HINTS = {
    "image_too_large": " (server flags --max-image-pixels, --max-body-bytes)",
    "remote_urls_disabled": "; send the image inline as a data: URL (data:image/png;base64,...) or upload it, "
                            "or start the server with --allow-remote-urls",
    "local_paths_disabled": "; send the image inline as a data: URL or upload it, or start the server with "
                            "--allow-local-paths DIR",
    "local_path_not_allowed": " (--allow-local-paths)",
}


def image_policy(settings: ServeSettings) -> ImagePolicy:
    """The server's image rules: data: URLs and uploads; local files under --allow-local-paths only; remote
    URLs with --allow-remote-urls; the pixel and size limits."""
    return ImagePolicy.for_server(settings.allow_local_paths, settings.allow_remote_urls, settings.max_image_pixels,
                                  settings.max_body_bytes, settings.remote_timeout_s, _HINTS)


def decode_image(data: bytes, settings: ServeSettings, what: str) -> Image.Image:
    """Open uploaded ``data`` as an image, refusing corrupt files and images above the pixel limit (400)."""
    try:
        return image_input.decode_image(data, image_policy(settings), what)
    except ImageInputError as e:
        raise bad_request(public_text(str(e)), param=what, code=e.code) from None


def read_image_ref(ref: str, settings: ServeSettings, what: str) -> Image.Image:
    """An image given by reference in JSON: a data: URL, or (when allowed) a local file or a URL (400 if not)."""
    try:
        return image_input.read_image(ref, image_policy(settings), what)
    except ImageInputError as e:
        raise bad_request(public_text(str(e)), param=what, code=e.code) from None


def encode_image_bytes(img: Image.Image, output_format: str = "png", meta: dict | None = None) -> bytes:
    """``img`` encoded as ``output_format`` (png, jpeg, webp); a PNG carries ``meta`` (prompt, seed, knobs,
    model) in its text chunks."""
    return encode_image_as(img, FORMATS[output_format][0], meta)


def encode_image(img: Image.Image, output_format: str = "png", meta: dict | None = None) -> str:
    """Base64 of ``img`` in ``output_format`` (png, jpeg, webp)."""
    return base64.b64encode(encode_image_bytes(img, output_format, meta)).decode("ascii")


def data_url(img: Image.Image, output_format: str = "png", meta: dict | None = None) -> str:
    return f"data:{FORMATS[output_format][1]};base64,{encode_image(img, output_format, meta)}"
