"""What the routes share: the server's state (pipeline, worker, settings, metrics, served names, default
size) with the checks and job runners every endpoint uses, and the helpers that shape answers."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from bagel_engine.engine_protocol import Pipeline
from bagel_engine.think_text import ThinkStream
from . import tasks
from ._engine import INPUT_ERRORS
from .errors import APIError, bad_request, describe_validation_errors, internal_error
from . import compat
from .image_store import PREFIX as IMAGE_FILES
from .image_store import ImageStore
from .images import encode_image, encode_image_bytes
from .metrics import Metrics
from .schemas import IMAGE_KNOBS, THINK_KNOBS, ChatCompletionRequest
from .settings import ServeSettings
from .replicas import ReplicaFailed, wants_previews
from .worker import JobCancelled, ModelWorker, QueueFull, WorkerStopped

log = logging.getLogger("bagel_engine.serve")

_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX*]\s*(\d{1,6})\s*$")


class ServerState:
    """One server's state; routes reach it as ``request.app.state.bagel``."""

    def __init__(self, pipe: Pipeline, settings: ServeSettings):
        self.pipe, self.settings = pipe, settings
        self.metrics = Metrics()
        self.worker = ModelWorker(pipe, queue_size=settings.queue_size, metrics=self.metrics,
                                  max_batch=settings.max_batch, max_step_tokens=settings.max_step_tokens)
        self.names = list(settings.served_model_names) or [str(getattr(pipe, "model_name", None) or "bagel")]
        # Also accepted in `model` fields (not listed): the last path component of the name, and "bagel".
        self.accepted = set(self.names) | {n.rstrip("/").rsplit("/", 1)[-1] for n in self.names} | {"bagel"}
        cfg = pipe.config
        self.step = int(cfg.latent_downsample)
        self.max_side = int(cfg.max_image_side)
        defaults = getattr(pipe, "task_defaults", None)  # the model's own size (task_defaults.json), else 1024
        self.default_w, self.default_h = (max(self.step, min(side, self.max_side) // self.step * self.step)
                                          for side in ((defaults.width, defaults.height) if defaults else (1024, 1024)))
        self.created = int(time.time())
        self.images = ImageStore(settings.url_ttl_s, settings.url_max_images)  # response_format "url"

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.accepted:
            raise APIError(404, f"model {name!r} is not served here; this server serves {', '.join(map(repr, self.names))}",
                           param="model", code="model_not_found")

    def parse_size(self, size: str | None, param: str = "size") -> tuple[int, int]:
        if size is None or size.strip().lower() == "auto":
            return self.default_w, self.default_h
        m = _SIZE.match(size)
        if not m:
            raise bad_request(f"size must be 'WIDTHxHEIGHT' such as '{self.default_w}x{self.default_h}' (got {size!r})",
                              param)
        w, h = int(m.group(1)), int(m.group(2))
        for side, what in ((w, "width"), (h, "height")):
            if side % self.step or not self.step <= side <= self.max_side:
                raise bad_request(
                    f"size {w}x{h}: {what} {side} must be a multiple of {self.step} between {self.step} and {self.max_side} "
                    f"for this model", param)
        return w, h

    def check_n(self, n: int) -> None:
        if n > self.settings.max_images:
            raise bad_request(f"n={n} is above this server's limit of {self.settings.max_images} images per request "
                              "(server flag --max-images)", "n")

    def check_image_count(self, count: int, param: str) -> None:
        if count > self.settings.max_images:
            raise bad_request(f"{count} input images is above this server's limit of {self.settings.max_images} per "
                              "request (server flag --max-images)", param, code="too_many_images")

    def submit(self, kind: str, fn: Any) -> tuple[Any, "asyncio.Future[Any]"]:
        """Queue a job (429 when the queue is full, 503 when shutting down); the job and its future."""
        try:
            job = self.worker.submit(kind, fn)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)}) from None
        except WorkerStopped as e:
            raise APIError(503, str(e), code="shutting_down") from None
        fut = asyncio.wrap_future(job.future)
        fut.add_done_callback(_consume)
        return job, fut

    async def run_job(self, request: Request, kind: str, fn: Any) -> Any:
        job, fut = self.submit(kind, fn)
        try:
            while not fut.done():
                await asyncio.wait({fut}, timeout=self.settings.disconnect_poll_s)
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
            raise job_error(e, kind) from None

    def stream_job(self, request: Request, kind: str, make_fn: Any, opening: list[str], item_events: Any,
                   final_events: Any, merge: Any = None) -> StreamingResponse:
        """A job whose progress goes out as server-sent events. ``make_fn(push)`` builds the job, ``push(item)``
        being called in the worker thread; ``item_events(item)`` and ``await final_events(out)`` give the
        events. ``merge(items) -> item``: items that arrived together go out as one (text pieces written
        while the loop was busy become one chunk: fewer writes when many streams share the model). The job
        is queued before the response starts (a full queue is still a 429); an error after the start is the
        stream's last event; a client that goes away cancels the job."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        fn = make_fn(lambda item: loop.call_soon_threadsafe(items.put_nowait, item))
        job, fut = self.submit(kind, fn)

        async def events() -> Any:
            try:
                for event in opening:
                    yield event
                getter = None
                while True:
                    getter = getter or asyncio.ensure_future(items.get())
                    done, _ = await asyncio.wait({getter, fut}, timeout=self.settings.disconnect_poll_s,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        batch = [getter.result()]
                        while merge is not None and not items.empty():
                            batch.append(items.get_nowait())
                        for item in (batch if merge is None else [merge(batch)]):
                            for event in item_events(item):
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
                    yield f"data: {json.dumps(job_error(e, kind).body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                for event in await final_events(out):
                    yield event
            finally:
                if not fut.done():
                    job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def stream_chat(self, request: Request, req: ChatCompletionRequest, conv: Any, text_kw: dict) -> StreamingResponse:
        """The answer in OpenAI's chunk format: a first chunk with the role, then ``delta.reasoning_content``
        (think text) and ``delta.content`` as the model writes them, a last chunk with ``finish_reason``,
        the usage chunk when asked, ``data: [DONE]``."""
        splitter = ThinkStream(req.think)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": req.model or self.names[0]}

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def deltas(parts: list[tuple[str, str]]) -> list[str]:
            return [chunk({"reasoning_content" if kind == "reasoning" else "content": text}) for kind, text in parts]

        async def final(out: Any) -> list[str]:
            events = deltas(splitter.finish()) + [chunk({}, getattr(out, "finish_reason", None) or "stop")]
            if req.stream_options is not None and req.stream_options.include_usage:
                events.append(f"data: {json.dumps({**head, 'choices': [], 'usage': usage(out)})}\n\n")
            return events + ["data: [DONE]\n\n"]

        return self.stream_job(
            request, "chat",
            lambda push: tasks.text_job(conv, think=req.think, seed=req.seed, text_kw=text_kw, on_text=push),
            [chunk({"role": "assistant", "content": ""})], lambda delta: deltas(splitter.feed(delta)), final,
            merge="".join)

    def stream_image(self, request: Request, kind: str, event_prefix: str, req: Any, fmt: str, make_job: Any) -> StreamingResponse:
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

            return make_job(wants_previews(on_step, functools.partial(tasks.wants_preview, count=count)) if count
                            else None)

        def event(name: str, body: dict) -> str:
            return f"event: {name}\ndata: {json.dumps({'type': name, 'created_at': int(time.time()), **body})}\n\n"

        def partial(item: tuple) -> list[str]:
            index, step, total, b64 = item
            return [event(f"{event_prefix}.partial_image", {"b64_json": b64, "partial_image_index": index,
                                                            "output_format": fmt, "step": step, "total_steps": total})]

        async def final(outs: Any) -> list[str]:
            out = outs[0]
            self.metrics.inc("bagel_images_generated_total")
            b64 = await run_in_threadpool(encode_image, out.image, fmt)
            w, h = out.image.size
            return [event(f"{event_prefix}.completed", {"b64_json": b64, "output_format": fmt, "size": f"{w}x{h}",
                                                        "seed": getattr(out, "seed", None)})]

        return self.stream_job(request, kind, make_fn, [], partial, final)


def parse_body(model: type[BaseModel], raw: bytes, strict: bool = False) -> tuple[Any, list[str]]:
    """The validated request and the fields ignored (``serve/compat.py``: OpenAI extras, ``extra_body``,
    diffusers' names)."""
    raw, ignored = compat.normalize(raw or b"", strict)
    try:
        return model.model_validate_json(raw), ignored
    except ValidationError as e:
        raise validation_error(e) from None

async def parse_json(model: type[BaseModel], raw: bytes, strict: bool = False) -> tuple[Any, list[str]]:
    if len(raw) > 256 * 1024:  # inline images: keep the event loop free while parsing
        return await run_in_threadpool(parse_body, model, raw, strict)
    return parse_body(model, raw, strict)

def image_knobs(req: Any) -> dict[str, Any]:
    return req.given(IMAGE_KNOBS + THINK_KNOBS)

def images_response(outs: list[Any], fmt: str, think: bool, store: ImageStore | None = None,
                    base_url: str = "", describe: Any = None) -> dict[str, Any]:
    """OpenAI's images answer: each image inline (``b64_json``) or, with a ``store``, as a URL under
    ``base_url`` that this server serves for a bounded time. ``describe(out)``: the metadata a PNG carries."""
    data = []
    for out in outs:
        meta = describe(out) if describe is not None else None
        if store is not None:
            name = store.put(encode_image_bytes(out.image, fmt, meta), fmt)
            item: dict[str, Any] = {"url": f"{base_url.rstrip('/')}{IMAGE_FILES}{name}", "seed": out.seed}
        else:
            item = {"b64_json": encode_image(out.image, fmt, meta), "seed": out.seed}
        if think:
            item["revised_prompt"] = out.text
        data.append(item)
    w, h = outs[0].image.size
    return {"created": int(time.time()), "data": data, "output_format": fmt, "size": f"{w}x{h}",
            "timings": [dict(getattr(o, "timings", {}) or {}) for o in outs]}


def job_error(e: BaseException, kind: str = "chat") -> APIError:
    """The HTTP error for a job that raised ``e`` (500s are logged with their incident id)."""
    if isinstance(e, INPUT_ERRORS):
        return APIError(400, str(e), code="invalid_input")
    if isinstance(e, JobCancelled):
        return APIError(499, f"the job was cancelled ({e})", code="cancelled")
    if isinstance(e, WorkerStopped):
        return APIError(503, str(e), code="shutting_down")
    if isinstance(e, ReplicaFailed):
        log.warning("%s job: %s", kind, e)
        return APIError(503, str(e), code="replica_failed", headers={"Retry-After": "1"})
    error, incident = internal_error(e)
    log.error("%s job failed (incident %s)", kind, incident, exc_info=e)
    return error


def usage(out: Any) -> dict[str, int] | None:
    """OpenAI's usage of a text answer: tokens of the context it was decoded from, and tokens written."""
    prompt, completion = getattr(out, "prompt_tokens", None), getattr(out, "completion_tokens", None)
    if prompt is None or completion is None:
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def validation_error(e: ValidationError) -> APIError:
    message, param = describe_validation_errors(e.errors())
    kinds = {x["type"] for x in e.errors()}
    code = "unknown_parameter" if "extra_forbidden" in kinds else "missing_parameter" if "missing" in kinds else \
        "invalid_value"
    return APIError(400, message, param=param, code=code)


def _consume(fut: "asyncio.Future[Any]") -> None:
    if not fut.cancelled():
        fut.exception()  # mark the exception retrieved: a cancelled client's job is nobody's error


def split_list(value: str) -> list[str]:
    v = value.strip()
    if v.startswith("["):
        try:
            parsed = json.loads(v)
        except json.JSONDecodeError:
            raise bad_request(f"cfg_interval: {value!r} is not a list of two numbers", "cfg_interval") from None
        if isinstance(parsed, list):
            return [str(x) for x in parsed]
    return [p.strip() for p in v.split(",") if p.strip()] if "," in v else [v]


def one_of(req: Any, names: tuple[str, ...]) -> int | None:
    given = [n for n in names if getattr(req, n) is not None]
    if len(given) > 1:
        raise bad_request(f"give only one of {', '.join(map(repr, given))}", given[1])
    return getattr(req, given[0]) if given else None


def sampling(req: Any) -> dict[str, Any]:
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
