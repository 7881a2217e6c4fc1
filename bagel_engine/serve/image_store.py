"""Images answered as ``response_format: "url"``: kept in memory for a bounded time and served at
``/v1/images/files/<id>.<format>``. The id is 128 random bits: the URL itself is the key (like a
signed URL), so fetching it needs no API key; it stops working after ``ttl_s`` seconds, and the
oldest images go first when more than ``max_images`` are kept."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PREFIX = "/v1/images/files/"


class ImageStore:
    def __init__(self, ttl_s: float = 3600.0, max_images: int = 256, clock=time.monotonic):
        self.ttl_s, self.max_images, self.clock = float(ttl_s), int(max_images), clock
        self._items: OrderedDict[str, tuple[bytes, str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes, fmt: str) -> str:
        """Keep ``data`` (an encoded ``fmt`` image); returns its file name (``<id>.<fmt>``)."""
        name = f"{secrets.token_hex(16)}.{fmt}"
        with self._lock:
            self._expire()
            self._items[name] = (data, MEDIA_TYPES[fmt], self.clock() + self.ttl_s)
            while len(self._items) > self.max_images:
                self._items.popitem(last=False)
        return name

    def get(self, name: str) -> tuple[bytes, str] | None:
        """The image and its media type, or None when unknown or expired."""
        with self._lock:
            self._expire()
            item = self._items.get(name)
        return None if item is None else (item[0], item[1])

    def _expire(self) -> None:
        now = self.clock()
        while self._items:
            name, (_, _, expires) = next(iter(self._items.items()))
            if expires > now:
                break
            self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)
