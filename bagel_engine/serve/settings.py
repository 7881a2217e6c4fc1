"""Server settings: every limit and switch of ``bagel serve`` in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServeSettings:
    # Queueing: ``max_batch`` jobs run at once (batched step by step by the engine's scheduler);
    # ``queue_size`` more may wait, the next gets a 429.
    queue_size: int = 8
    max_batch: int = 8
    max_step_tokens: int | None = None  # rows in one step's forward (None: only max_batch bounds a step)
    # Security: a bearer token every endpoint but /health requires (None: open server).
    api_key: str | None = None
    # Limits.
    max_body_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8  # input images per request, and `n` (output images) per request
    max_timesteps: int = 250  # num_timesteps per request
    max_model_len: int | None = None  # tokens per request (prompt, images, think, answer); None: the model's
    # Image references that are neither data: URLs nor uploads. Both are off by default.
    allow_local_paths: list[Path] = field(default_factory=list)  # directories a request may read under
    allow_remote_urls: bool = False
    remote_timeout_s: float = 15.0
    # Names the model answers to in `model` fields and /v1/models (the first one is listed).
    served_model_names: list[str] = field(default_factory=list)
    # Web UI mounted at /ui (needs the `ui` extra), in this language ("en", "zh": bagel_engine.ui.strings).
    mount_ui: bool = False
    ui_lang: str = "en"
    # OpenAI clients: fields that do not change the result are ignored with a Warning header (strict: a 400).
    strict: bool = False
    # response_format "url": images kept in memory and served at /v1/images/files/... for this long.
    url_ttl_s: float = 3600.0
    url_max_images: int = 256  # the oldest go first beyond this
    # How often a waiting request checks whether its client is still connected (seconds).
    disconnect_poll_s: float = 0.1

    def __post_init__(self) -> None:
        if self.queue_size < 0 or self.max_batch < 1 or (self.max_step_tokens is not None and self.max_step_tokens < 1):
            raise ValueError("queue_size must be >= 0, max_batch >= 1 and max_step_tokens >= 1")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if self.max_image_pixels < 1 or self.max_images < 1:
            raise ValueError("max_image_pixels and max_images must be >= 1")
        if self.max_timesteps < 2 or (self.max_model_len is not None and self.max_model_len < 16):
            raise ValueError("max_timesteps must be >= 2 and max_model_len >= 16")
        self.allow_local_paths = [Path(p).resolve() for p in self.allow_local_paths]
        if self.api_key is not None and not self.api_key.strip():
            self.api_key = None
