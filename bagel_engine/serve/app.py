"""The OpenAI-compatible HTTP server: ``create_app(pipe, settings)`` returns a FastAPI app.

Endpoints (``serve/routes.py``): POST /v1/images/generations, POST /v1/images/edits, POST /v1/chat/completions,
GET /v1/models, GET /health, GET /metrics, and the web UI at /ui when mounted. The routes are top-level
functions over the server's state (``serve/state.py``); the gate in front of them (``serve/gate.py``) keeps
metrics, auth and the body limit.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from http.cookies import CookieError, SimpleCookie
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from bagel_engine.engine_protocol import Pipeline
from .errors import APIError, describe_validation_errors, error_body, public_text
from .gate import BodyTooLarge, _Gate, _header, _too_large_body
from .routes import router
from .settings import ServeSettings
from .state import ServerState
from .worker import ModelWorker

log = logging.getLogger("bagel_engine.serve")


def create_app(pipe: Pipeline, settings: ServeSettings | None = None, *, ui: Any = None, ui_path: str = "/ui") -> FastAPI:
    """Build the server around a loaded pipeline.

    ``ui``: a callable ``(worker, pipe, settings) -> gradio.Blocks`` to mount at ``ui_path``
    (``bagel serve`` passes :func:`bagel_engine.ui.build_ui` unless ``--no-ui``)."""
    settings = settings or ServeSettings()
    if hasattr(pipe, "limits"):  # what one request may ask for, checked by the pipeline before any work
        from bagel_engine.params import Limits

        pipe.limits = Limits(max_model_len=settings.max_model_len, max_timesteps=settings.max_timesteps)
    state = ServerState(pipe, settings)
    worker, metrics = state.worker, state.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop, 5.0)

    app = FastAPI(title="bagel-engine", summary="OpenAI-compatible server for BAGEL-7B-MoT", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.bagel = state
    app.state.worker = worker
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.pipe = pipe

    # -- errors --------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        e.message = public_text(e.message)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        return JSONResponse(_too_large_body(settings.max_body_bytes), status_code=413)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(e.errors()))
        return JSONResponse(error_body(400, message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        text = {404: f"no such endpoint: {request.method} {request.url.path}",
                405: f"method {request.method} not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(e.status_code, text), status_code=e.status_code, headers=e.headers)

    app.include_router(router)
    ui_user = _mount_ui(app, ui, worker, pipe, settings, ui_path) if ui is not None else None
    app.add_middleware(_Gate, settings=settings, metrics=metrics, ui_path=ui_path if ui is not None else None,
                       ui_user=ui_user)
    return app


def _mount_ui(app: FastAPI, ui: Any, worker: ModelWorker, pipe: Pipeline, settings: ServeSettings, path: str) -> Any:
    """Mount the gradio UI at ``path``; returns ``scope -> bool``: whether a request carries a live UI login."""
    import gradio as gr
    from starlette.routing import Mount

    blocks = ui(worker, pipe, settings)
    auth = None
    if settings.api_key:
        key = settings.api_key

        def auth(username: str, password: str) -> bool:  # noqa: F811 - any user name, the API key as password
            return hmac.compare_digest(password.encode(), key.encode())

    gr.mount_gradio_app(app, blocks, path=path, auth=auth,
                        auth_message="Log in with any user name and this server's API key as the password.",
                        max_file_size=settings.max_body_bytes, footer_links=[],
                        css=getattr(blocks, "bagel_css", None))

    @app.get("/", include_in_schema=False)
    async def _root() -> Response:
        return RedirectResponse(path + "/")

    gradio_app = next(r.app for r in app.routes if isinstance(r, Mount) and r.path == path)

    def logged_in(scope: dict) -> bool:
        cookies = SimpleCookie()
        try:
            cookies.load(_header(scope, b"cookie") or "")
        except CookieError:
            return False
        names = (f"access-token-{gradio_app.cookie_id}", f"access-token-unsecure-{gradio_app.cookie_id}")
        return any(n in cookies and cookies[n].value in gradio_app.tokens for n in names)

    return logged_in
