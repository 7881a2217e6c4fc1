"""The OpenAI-compatible HTTP server: ``create_app(pipe, settings)`` returns a FastAPI app.

Endpoints: POST /v1/images/generations, POST /v1/images/edits, POST /v1/chat/completions,
GET /v1/models, GET /health, GET /metrics, and the web UI at /ui when mounted.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from bagel_engine.engine_protocol import Pipeline
from . import tasks
from ._engine import INPUT_ERRORS
from .errors import APIError, bad_request, describe_validation_errors, error_body, internal_error, public_text
from .images import data_url, decode_image, encode_image, read_image_ref
from .metrics import Metrics
from .schemas import (
    IMAGE_KNOBS,
    THINK_KNOBS,
    ChatCompletionRequest,
    ImageEditJSONRequest,
    ImageEditRequest,
    ImageGenerationRequest,
)
from .settings import ServeSettings
from .worker import JobCancelled, ModelWorker, QueueFull, WorkerStopped

log = logging.getLogger("bagel_engine.serve")

OPEN_PATHS = frozenset({"/health"})
ENDPOINTS = frozenset({
    "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
})
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX*]\s*(\d{1,6})\s*$")


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
            if self.settings.api_key and path not in OPEN_PATHS and not self._authorized(scope):
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
def create_app(pipe: Pipeline, settings: ServeSettings | None = None, *, ui: Any = None, ui_path: str = "/ui") -> FastAPI:
    """Build the server around a loaded pipeline.

    ``ui``: a callable ``(worker, pipe, settings) -> gradio.Blocks`` to mount at ``ui_path``
    (``bagel serve`` passes :func:`bagel_engine.ui.build_ui` unless ``--no-ui``)."""
    settings = settings or ServeSettings()
    if hasattr(pipe, "limits"):  # what one request may ask for, checked by the pipeline before any work
        from bagel_engine.params import Limits

        pipe.limits = Limits(max_model_len=settings.max_model_len, max_timesteps=settings.max_timesteps)
    metrics = Metrics()
    worker = ModelWorker(pipe, queue_size=settings.queue_size, metrics=metrics, max_batch=settings.max_batch)
    names = list(settings.served_model_names) or [str(getattr(pipe, "model_name", None) or "bagel")]
    # Also accepted in `model` fields (not listed): the last path component of the name, and "bagel".
    accepted = set(names) | {n.rstrip("/").rsplit("/", 1)[-1] for n in names} | {"bagel"}
    cfg = pipe.config
    step = int(cfg.latent_downsample)
    max_side = int(cfg.max_image_side)
    defaults = getattr(pipe, "task_defaults", None)  # the model's own size (task_defaults.json), else 1024
    default_w, default_h = (max(step, min(side, max_side) // step * step)
                            for side in ((defaults.width, defaults.height) if defaults else (1024, 1024)))
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop, 5.0)

    app = FastAPI(title="bagel-engine", summary="OpenAI-compatible server for BAGEL-7B-MoT", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
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

    # -- helpers -------------------------------------------------------------------------------
    def _parse(model: type[BaseModel], raw: bytes) -> Any:
        try:
            return model.model_validate_json(raw or b"")
        except ValidationError as e:
            raise _validation_error(e) from None

    async def parse_json(model: type[BaseModel], raw: bytes) -> Any:
        if len(raw) > 256 * 1024:  # inline images: keep the event loop free while parsing
            return await run_in_threadpool(_parse, model, raw)
        return _parse(model, raw)

    def check_model(name: str | None) -> None:
        if name is not None and name not in accepted:
            raise APIError(404, f"model {name!r} is not served here; this server serves {', '.join(map(repr, names))}",
                           param="model", code="model_not_found")

    def parse_size(size: str | None, param: str = "size") -> tuple[int, int]:
        if size is None or size.strip().lower() == "auto":
            return default_w, default_h
        m = _SIZE.match(size)
        if not m:
            raise bad_request(f"size must be 'WIDTHxHEIGHT' such as '{default_w}x{default_h}' (got {size!r})",
                              param)
        w, h = int(m.group(1)), int(m.group(2))
        for side, what in ((w, "width"), (h, "height")):
            if side % step or not step <= side <= max_side:
                raise bad_request(
                    f"size {w}x{h}: {what} {side} must be a multiple of {step} between {step} and {max_side} "
                    f"for this model", param)
        return w, h

    def check_n(n: int) -> None:
        if n > settings.max_images:
            raise bad_request(f"n={n} is above this server's limit of {settings.max_images} images per request "
                              "(server flag --max-images)", "n")

    def check_image_count(count: int, param: str) -> None:
        if count > settings.max_images:
            raise bad_request(f"{count} input images is above this server's limit of {settings.max_images} per "
                              "request (server flag --max-images)", param, code="too_many_images")

    def submit(kind: str, fn: Any) -> tuple[Any, "asyncio.Future[Any]"]:
        """Queue a job (429 when the queue is full, 503 when shutting down); the job and its future."""
        try:
            job = worker.submit(kind, fn)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)}) from None
        except WorkerStopped as e:
            raise APIError(503, str(e), code="shutting_down") from None
        fut = asyncio.wrap_future(job.future)
        fut.add_done_callback(_consume)
        return job, fut

    async def run_job(request: Request, kind: str, fn: Any) -> Any:
        job, fut = submit(kind, fn)
        try:
            while not fut.done():
                await asyncio.wait({fut}, timeout=settings.disconnect_poll_s)
                if not fut.done() and await request.is_disconnected():
                    job.cancel()
                    log.info("client disconnected: %s job cancelled", kind)
                    raise APIError(499, "the client disconnected; the job was cancelled", code="cancelled")
        except asyncio.CancelledError:
            job.cancel()
            raise
        try:
            return fut.result()
        except Exception as e:  # noqa: BLE001 - a failing job answers 500, the server stays up
            raise _job_error(e, kind) from None

    def image_knobs(req: Any) -> dict[str, Any]:
        return req.given(IMAGE_KNOBS + THINK_KNOBS)

    def images_response(outs: list[Any], fmt: str, think: bool) -> dict[str, Any]:
        data = []
        for out in outs:
            item: dict[str, Any] = {"b64_json": encode_image(out.image, fmt), "seed": out.seed}
            if think:
                item["revised_prompt"] = out.text
            data.append(item)
        w, h = outs[0].image.size
        return {"created": int(time.time()), "data": data, "output_format": fmt, "size": f"{w}x{h}",
                "timings": [dict(getattr(o, "timings", {}) or {}) for o in outs]}

    # -- endpoints -----------------------------------------------------------------------------
    def body_schema(model: type[BaseModel], content_type: str = "application/json") -> dict:
        return {"requestBody": {"required": True, "content": {content_type: {"schema": model.model_json_schema()}}}}

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = worker.alive
        return JSONResponse({"status": "ok" if ok else "worker stopped", "model": names[0], "busy": worker.busy,
                             "running": worker.running, "max_batch": worker.max_batch,
                             "queue_depth": worker.queue_depth, "queue_size": settings.queue_size},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": n, "object": "model", "created": created, "owned_by": "bagel-engine"} for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return {"id": model_id, "object": "model", "created": created, "owned_by": "bagel-engine"}

    @app.post("/v1/images/generations", openapi_extra=body_schema(ImageGenerationRequest))
    async def images_generations(request: Request) -> Any:
        req: ImageGenerationRequest = await parse_json(ImageGenerationRequest, await request.body())
        check_model(req.model)
        check_n(req.n)
        width, height = parse_size(req.size)
        fmt = req.output_format or "png"
        if req.stream:
            return stream_image(request, "generate", "image_generation", req, fmt, lambda on_step: tasks.generate_job(
                req.prompt, width=width, height=height, think=req.think, seed=req.seed, knobs=image_knobs(req),
                on_step=on_step))
        fn = tasks.generate_job(req.prompt, width=width, height=height, n=req.n, think=req.think, seed=req.seed,
                                knobs=image_knobs(req))
        outs = await run_job(request, "generate", fn)
        metrics.inc("bagel_images_generated_total", len(outs))
        return await run_in_threadpool(images_response, outs, fmt, req.think)

    @app.post("/v1/images/edits", openapi_extra=body_schema(ImageEditJSONRequest))
    async def images_edits(request: Request) -> Any:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            req, images = await _read_edit_form(request)
        elif ctype in ("application/json", ""):
            req = await parse_json(ImageEditJSONRequest, await request.body())
            check_image_count(len(req.image), "image")
            images = []
            for i, ref in enumerate(req.image):
                images.append(await run_in_threadpool(read_image_ref, ref, settings, f"image[{i}]"))
        else:
            raise APIError(415, f"send the edit as multipart/form-data (OpenAI style) or JSON, not {ctype!r}",
                           code="unsupported_media_type")
        check_model(req.model)
        check_n(req.n)
        fmt = req.output_format or "png"
        if req.stream:
            return stream_image(request, "edit", "image_edit", req, fmt, lambda on_step: tasks.edit_job(
                images, req.prompt, think=req.think, seed=req.seed, knobs=image_knobs(req), on_step=on_step))
        fn = tasks.edit_job(images, req.prompt, n=req.n, think=req.think, seed=req.seed, knobs=image_knobs(req))
        outs = await run_job(request, "edit", fn)
        metrics.inc("bagel_images_generated_total", len(outs))
        return await run_in_threadpool(images_response, outs, fmt, req.think)

    async def _read_edit_form(request: Request) -> tuple[ImageEditRequest, list[Any]]:
        try:
            form = await request.form(max_files=settings.max_images + 1, max_fields=256,
                                      max_part_size=settings.max_body_bytes)
        except BodyTooLarge:
            raise
        except Exception as e:  # noqa: BLE001 - malformed multipart bodies
            detail = getattr(e, "detail", None) or str(e)
            raise bad_request(f"could not read the multipart form: {detail}", code="invalid_form") from None
        try:
            fields: dict[str, Any] = {}
            uploads: list[tuple[str, Any]] = []
            for key, value in form.multi_items():
                name = key[:-2] if key.endswith("[]") else key
                if name in ("mask",):
                    raise bad_request("'mask' is not supported: BAGEL edits the whole image following the prompt",
                                      "mask", code="unknown_parameter")
                if name == "image":
                    uploads.append((key, value))
                    continue
                if isinstance(value, UploadFile):
                    raise bad_request(f"form field '{key}' must be text, not a file", key)
                if name == "cfg_interval":
                    fields.setdefault(name, []).extend(_split_list(value))
                elif key.endswith("[]"):
                    fields.setdefault(name, []).append(value)
                elif name in fields:
                    raise bad_request(f"form field '{name}' is given more than once", name)
                else:
                    fields[name] = value
            if not uploads:
                raise bad_request("missing required parameter(s): 'image' (one or several image files)", "image",
                                  code="missing_parameter")
            check_image_count(len(uploads), "image")
            try:
                req = ImageEditRequest.model_validate(fields, strict=False)
            except ValidationError as e:
                raise _validation_error(e) from None
            images = []
            for i, (_key, value) in enumerate(uploads):
                what = f"image[{i}]" if len(uploads) > 1 else "image"
                if isinstance(value, UploadFile):
                    raw = await value.read()
                    images.append(await run_in_threadpool(decode_image, raw, settings, what))
                else:
                    images.append(await run_in_threadpool(read_image_ref, value, settings, what))
            return req, images
        finally:
            await form.close()

    @app.post("/v1/chat/completions", openapi_extra=body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Any:
        req: ChatCompletionRequest = await parse_json(ChatCompletionRequest, await request.body())
        check_model(req.model)
        modality = (req.modalities or ["text"])[0]
        # Count images before decoding any of them.
        refs = [p.image_url.url for m in req.messages for p in m.content if p.type == "image_url"]
        check_image_count(len(refs), "messages")
        turns = []
        for mi, m in enumerate(req.messages):
            imgs, texts = [], []
            for pi, p in enumerate(m.content):
                if p.type == "image_url":
                    what = f"messages[{mi}].content[{pi}].image_url"
                    imgs.append(await run_in_threadpool(read_image_ref, p.image_url.url, settings, what))
                elif p.text and p.text.strip():
                    texts.append(p.text)
            turns.append((imgs, "\n".join(texts)))
        conv = tasks.conversation_from_turns(turns)
        if not any(isinstance(x, str) for x in conv.items):
            raise bad_request("the messages hold no text: give a prompt or a question", "messages")
        text_kw = _sampling(req)
        if modality == "text":
            stray = [name for name in IMAGE_KNOBS + ("max_think_token_n", "size", "output_format")
                     if getattr(req, name) is not None]
            if stray:
                raise bad_request(f"parameter(s) {', '.join(map(repr, stray))} only apply when modalities is "
                                  '["image"]', stray[0])
            limit = _one_of(req, ("max_new_tokens", "max_completion_tokens", "max_tokens"))
            if limit is not None:
                text_kw["max_new_tokens"] = limit
            if req.stream:
                return stream_chat(request, req, conv, text_kw)
            fn = tasks.text_job(conv, think=req.think, seed=req.seed, text_kw=text_kw)
            out = await run_job(request, "chat", fn)
            reasoning, answer = tasks.split_think(out.text) if req.think else (None, out.text or "")
            if req.think:
                reasoning = reasoning or ""  # think asked: always report it, even when the model wrote none
            message: dict[str, Any] = {"role": "assistant", "content": answer}
        else:
            if req.stream:
                raise bad_request("stream applies to text answers; for a picture forming step by step use "
                                  "/v1/images/generations", "stream")
            if req.max_new_tokens is not None:
                raise bad_request("'max_new_tokens' applies to text answers; for the think text of an image use "
                                  "'max_think_token_n' (or max_tokens)", "max_new_tokens")
            simple = conv.simple()
            if req.size is not None and simple is not None and simple[0]:
                raise bad_request("'size' does not apply when editing images: the output takes the size of the last "
                                  "input image", "size")
            width, height = parse_size(req.size) if req.size is not None else (None, None)
            if width is None and (simple is None or not simple[0]):
                width, height = parse_size(None)
            knobs = req.given(IMAGE_KNOBS)
            knobs.update({k: v for k, v in text_kw.items() if k in THINK_KNOBS})
            limit = _one_of(req, ("max_think_token_n", "max_completion_tokens", "max_tokens"))
            if limit is not None:
                knobs["max_think_token_n"] = limit
            fn = tasks.image_job(conv, width=width, height=height, think=req.think, seed=req.seed, knobs=knobs)
            out = await run_job(request, "chat_image", fn)
            if out.image is None:
                raise APIError(500, "the model returned no image", code="internal_error")
            metrics.inc("bagel_images_generated_total")
            fmt = req.output_format or "png"
            url = await run_in_threadpool(data_url, out.image, fmt)
            reasoning = (out.text or "") if req.think else None
            message = {"role": "assistant", "content": "",
                       "images": [{"type": "image_url", "image_url": {"url": url}}]}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model or names[0],
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": getattr(out, "finish_reason", None) or "stop"}],
            "usage": _usage(out),
            "seed": getattr(out, "seed", None),
            "timings": dict(getattr(out, "timings", {}) or {}),
        }

    def stream_job(request: Request, kind: str, make_fn: Any, opening: list[str], item_events: Any,
                   final_events: Any) -> StreamingResponse:
        """A job whose progress goes out as server-sent events. ``make_fn(push)`` builds the job, ``push(item)``
        being called in the worker thread; ``item_events(item)`` and ``await final_events(out)`` give the
        events. The job is queued before the response starts (a full queue is still a 429); an error after
        the start is the stream's last event; a client that goes away cancels the job."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        fn = make_fn(lambda item: loop.call_soon_threadsafe(items.put_nowait, item))
        job, fut = submit(kind, fn)

        async def events() -> Any:
            try:
                for event in opening:
                    yield event
                getter = None
                while True:
                    getter = getter or asyncio.ensure_future(items.get())
                    done, _ = await asyncio.wait({getter, fut}, timeout=settings.disconnect_poll_s,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        for event in item_events(getter.result()):
                            yield event
                        getter = None
                        continue
                    if fut.done():
                        break
                    if await request.is_disconnected():
                        job.cancel()
                        log.info("client disconnected: streamed %s job cancelled", kind)
                        return
                if getter is not None:
                    getter.cancel()
                while not items.empty():  # items pushed just before the job ended
                    for event in item_events(items.get_nowait()):
                        yield event
                try:
                    out = fut.result()
                except Exception as e:  # noqa: BLE001 - the stream has started: the error is its last event
                    yield f"data: {json.dumps(_job_error(e, kind).body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                for event in await final_events(out):
                    yield event
            finally:
                if not fut.done():
                    job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def stream_chat(request: Request, req: ChatCompletionRequest, conv: Any, text_kw: dict) -> StreamingResponse:
        """The answer in OpenAI's chunk format: a first chunk with the role, then ``delta.reasoning_content``
        (think text) and ``delta.content`` as the model writes them, a last chunk with ``finish_reason``,
        the usage chunk when asked, ``data: [DONE]``."""
        splitter = tasks.ThinkStream(req.think)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": req.model or names[0]}

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def deltas(parts: list[tuple[str, str]]) -> list[str]:
            return [chunk({"reasoning_content" if kind == "reasoning" else "content": text}) for kind, text in parts]

        async def final(out: Any) -> list[str]:
            events = deltas(splitter.finish()) + [chunk({}, getattr(out, "finish_reason", None) or "stop")]
            if req.stream_options is not None and req.stream_options.include_usage:
                events.append(f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(out)})}\n\n")
            return events + ["data: [DONE]\n\n"]

        return stream_job(
            request, "chat",
            lambda push: tasks.text_job(conv, think=req.think, seed=req.seed, text_kw=text_kw, on_text=push),
            [chunk({"role": "assistant", "content": ""})], lambda delta: deltas(splitter.feed(delta)), final)

    def stream_image(request: Request, kind: str, event_prefix: str, req: Any, fmt: str, make_job: Any) -> StreamingResponse:
        """One image drawn with live previews (OpenAI's image streaming): ``partial_images`` events
        ``{event_prefix}.partial_image`` with the picture the step predicts, at evenly spaced steps, then
        ``{event_prefix}.completed`` with the image."""
        count = req.partial_images or 0

        def make_fn(push: Any) -> Any:
            taken: list[int] = []

            def on_step(preview: Any) -> None:  # in the worker thread: decode and encode there
                if len(taken) < count and preview.step in tasks.preview_steps(preview.total, count):
                    taken.append(preview.step)
                    push((len(taken) - 1, preview.step, preview.total, encode_image(preview.image(), fmt)))

            return make_job(on_step if count else None)

        def event(name: str, body: dict) -> str:
            return f"event: {name}\ndata: {json.dumps({'type': name, 'created_at': int(time.time()), **body})}\n\n"

        def partial(item: tuple) -> list[str]:
            index, step, total, b64 = item
            return [event(f"{event_prefix}.partial_image", {"b64_json": b64, "partial_image_index": index,
                                                            "output_format": fmt, "step": step, "total_steps": total})]

        async def final(outs: Any) -> list[str]:
            out = outs[0]
            metrics.inc("bagel_images_generated_total")
            b64 = await run_in_threadpool(encode_image, out.image, fmt)
            w, h = out.image.size
            return [event(f"{event_prefix}.completed", {"b64_json": b64, "output_format": fmt, "size": f"{w}x{h}",
                                                        "seed": getattr(out, "seed", None)})]

        return stream_job(request, kind, make_fn, [], partial, final)

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


def _job_error(e: BaseException, kind: str = "chat") -> APIError:
    """The HTTP error for a job that raised ``e`` (500s are logged with their incident id)."""
    if isinstance(e, INPUT_ERRORS):
        return APIError(400, str(e), code="invalid_input")
    if isinstance(e, JobCancelled):
        return APIError(499, f"the job was cancelled ({e})", code="cancelled")
    if isinstance(e, WorkerStopped):
        return APIError(503, str(e), code="shutting_down")
    error, incident = internal_error(e)
    log.error("%s job failed (incident %s)", kind, incident, exc_info=e)
    return error


def _usage(out: Any) -> dict[str, int] | None:
    """OpenAI's usage of a text answer: tokens of the context it was decoded from, and tokens written."""
    prompt, completion = getattr(out, "prompt_tokens", None), getattr(out, "completion_tokens", None)
    if prompt is None or completion is None:
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _validation_error(e: ValidationError) -> APIError:
    message, param = describe_validation_errors(e.errors())
    kinds = {x["type"] for x in e.errors()}
    code = "unknown_parameter" if "extra_forbidden" in kinds else "missing_parameter" if "missing" in kinds else \
        "invalid_value"
    return APIError(400, message, param=param, code=code)


def _consume(fut: "asyncio.Future[Any]") -> None:
    if not fut.cancelled():
        fut.exception()  # mark the exception retrieved: a cancelled client's job is nobody's error


def _split_list(value: str) -> list[str]:
    v = value.strip()
    if v.startswith("["):
        try:
            parsed = json.loads(v)
        except json.JSONDecodeError:
            raise bad_request(f"cfg_interval: {value!r} is not a list of two numbers", "cfg_interval") from None
        if isinstance(parsed, list):
            return [str(x) for x in parsed]
    return [p.strip() for p in v.split(",") if p.strip()] if "," in v else [v]


def _one_of(req: Any, names: tuple[str, ...]) -> int | None:
    given = [n for n in names if getattr(req, n) is not None]
    if len(given) > 1:
        raise bad_request(f"give only one of {', '.join(map(repr, given))}", given[1])
    return getattr(req, given[0]) if given else None


def _sampling(req: Any) -> dict[str, Any]:
    """do_sample / text_temperature, with OpenAI's ``temperature`` as an alternative spelling."""
    kw = {k: getattr(req, k) for k in ("do_sample", "text_temperature") if getattr(req, k) is not None}
    if req.temperature is not None:
        if kw:
            raise bad_request("give either 'temperature' or the BAGEL knobs 'do_sample' / 'text_temperature', "
                              "not both", "temperature")
        if req.temperature == 0:
            kw["do_sample"] = False
        else:
            kw.update(do_sample=True, text_temperature=req.temperature)
    return kw
