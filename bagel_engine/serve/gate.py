"""The gate in front of every route: metrics, bearer auth, the body size limit, and the web UI's rules
(same-origin only; every UI route but its login page needs the login)."""

from __future__ import annotations

import hmac
import json
import time
from typing import Any
from urllib.parse import urlsplit

from .errors import error_body
from .image_store import PREFIX as IMAGE_FILES  # response_format "url": the unguessable URL is the key
from .metrics import Metrics
from .settings import ServeSettings

OPEN_PATHS = frozenset({"/health"})
ENDPOINTS = frozenset({
    "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
})


class BodyTooLarge(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# The gate: metrics, bearer auth and the body size limit, in front of every route.
# ---------------------------------------------------------------------------------------------
class _Gate:
    def __init__(self, app: Any, settings: ServeSettings, metrics: Metrics, ui_path: str | None,
                 ui_user: Any = None) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.ui_path = ui_path
        self.ui_user = ui_user  # scope -> whether the request carries a live UI login

    def _is_ui(self, path: str) -> bool:
        return self.ui_path is not None and (path == self.ui_path or path.startswith(self.ui_path + "/"))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self._is_ui(path):
            await self._ui(scope, receive, send, path[len(self.ui_path):])
            return
        if scope["type"] != "http" or (path == "/" and self.ui_path is not None):
            await self.app(scope, receive, send)
            return
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]
        started = time.perf_counter()

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if (self.settings.api_key and path not in OPEN_PATHS and not path.startswith(IMAGE_FILES)
                    and not self._authorized(scope)):
                await _send_json(send_wrapper, 401, error_body(401, "missing or wrong API key: send the header "
                                 "'Authorization: Bearer <key>'", code="invalid_api_key"),
                                 {"www-authenticate": "Bearer"})
                return
            limit = self.settings.max_body_bytes
            length = _header(scope, b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await _send_json(send_wrapper, 413, _too_large_body(limit))
                return
            received = 0

            async def limited_receive() -> dict:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise BodyTooLarge()
                return message

            await self.app(scope, limited_receive, send_wrapper)
        finally:
            self.metrics.inc("bagel_requests_total", endpoint=endpoint, status=str(status[0]))
            self.metrics.observe("bagel_request_duration_seconds", time.perf_counter() - started, endpoint=endpoint)

    async def _ui(self, scope: dict, receive: Any, send: Any, sub: str) -> None:
        """The web UI: same-origin requests only (gradio would answer credentialed requests from other
        local origins), and with an API key every route but the login page's own behind the login."""
        refusal = None
        if not _same_origin(scope):
            refusal = (403, "cross-origin requests to the web UI are refused", "cross_origin")
        elif self.settings.api_key and not _ui_open_path(sub) and not (self.ui_user and self.ui_user(scope)):
            refusal = (401, "log in to the web UI first (any user name, the API key as the password)", "login_required")
        if refusal is None:
            await self.app(scope, receive, send)  # gradio has its own login and upload limits
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await _send_json(send, refusal[0], error_body(refusal[0], refusal[1], code=refusal[2]))

    def _authorized(self, scope: dict) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        key = self.settings.api_key or ""
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


# What the UI's login page itself loads (everything else under the UI needs a login when a key is set).
_UI_OPEN = {"", "/", "/login", "/logout", "/config", "/user", "/token", "/theme.css", "/favicon.ico", "/robots.txt",
            "/manifest.json", "/info", "/app_id"}
_UI_OPEN_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon", "/custom_component/")


def _ui_open_path(sub: str) -> bool:
    if sub.startswith("/gradio_api/") or sub == "/gradio_api":
        sub = sub[len("/gradio_api"):]
    return sub.rstrip("/") in _UI_OPEN or sub in _UI_OPEN or sub.startswith(_UI_OPEN_PREFIXES)


def _same_origin(scope: dict) -> bool:
    """No Origin header (not a browser's cross-site request), or one naming this very host."""
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    netloc = urlsplit(origin).netloc.lower()
    hosts = {(_header(scope, b"host") or "").lower(), (_header(scope, b"x-forwarded-host") or "").lower()}
    return bool(netloc) and netloc in hosts - {""}


def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _too_large_body(limit: int) -> dict:
    return error_body(413, f"the request body is larger than the limit of {limit} bytes (server flag --max-body-mb)",
                      code="body_too_large")


async def _send_json(send: Any, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


# ---------------------------------------------------------------------------------------------
# The app.
# ---------------------------------------------------------------------------------------------
