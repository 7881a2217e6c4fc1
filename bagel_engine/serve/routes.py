"""The HTTP routes, as top-level functions over the server's state (``state(request)``): /health, /metrics,
/v1/models, /v1/images/generations, /v1/images/edits, /v1/chat/completions, /v1/images/files/ (images
answered as URLs)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from bagel_engine.image_metadata import describe
from bagel_engine.think_text import split_think

from . import compat, tasks
from .errors import APIError, bad_request
from .gate import BodyTooLarge
from .replicas import ReplicaPool
from .images import data_url, decode_image, read_image_ref
from .schemas import (
    IMAGE_KNOBS,
    THINK_KNOBS,
    ChatCompletionRequest,
    ImageEditJSONRequest,
    ImageEditRequest,
    ImageGenerationRequest,
)
from .image_store import PREFIX as IMAGE_FILES
from .state import (ServerState, image_knobs, images_response, one_of, parse_json, sampling, split_list, usage,
                    validation_error)

router = APIRouter()


def state(request: Request) -> ServerState:
    return request.app.state.bagel


def answer(body: Any, ignored: list[str]) -> Any:
    """A route's answer with the ``Warning`` header naming the fields it ignored."""
    headers = compat.warning_headers(ignored)
    if not headers:
        return body
    if isinstance(body, Response):
        body.headers.update(headers)
        return body
    return JSONResponse(body, headers=headers)


def images_answer(st: ServerState, request: Request, outs: list[Any], fmt: str, req: Any, task: str) -> dict[str, Any]:
    url = req.response_format == "url"
    return images_response(outs, fmt, req.think, st.images if url else None, str(request.base_url),
                           lambda out: describe(task, req.prompt, out, st.names[0]))


def body_schema(model: type[BaseModel], content_type: str = "application/json") -> dict:
    return {"requestBody": {"required": True, "content": {content_type: {"schema": model.model_json_schema()}}}}


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    st = state(request)
    replicas = st.pipe.status() if isinstance(st.pipe, ReplicaPool) else None
    ok = st.worker.alive and (replicas is None or any(r["up"] for r in replicas))
    status = "ok" if ok else "worker stopped" if not st.worker.alive else "no replica up"
    return JSONResponse({"status": status, "model": st.names[0], "busy": st.worker.busy,
                         "running": st.worker.running, "max_batch": st.worker.max_batch,
                         "queue_depth": st.worker.queue_depth, "queue_size": st.settings.queue_size}
                        | ({"replicas": replicas} if replicas is not None else {}),
                        status_code=200 if ok else 503)

@router.get("/metrics")
async def metrics_endpoint(request: Request) -> PlainTextResponse:
    st = state(request)
    return PlainTextResponse(st.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    st = state(request)
    return {"object": "list",
            "data": [{"id": n, "object": "model", "created": st.created, "owned_by": "bagel-engine"} for n in st.names]}

@router.get("/v1/models/{model_id:path}")
async def model_info(model_id: str, request: Request) -> dict[str, Any]:
    st = state(request)
    st.check_model(model_id)
    return {"id": model_id, "object": "model", "created": st.created, "owned_by": "bagel-engine"}

@router.post("/v1/images/generations", openapi_extra=body_schema(ImageGenerationRequest))
async def images_generations(request: Request) -> Any:
    st = state(request)
    req: ImageGenerationRequest
    req, ignored = await parse_json(ImageGenerationRequest, await request.body(), st.settings.strict)
    st.check_model(req.model)
    st.check_n(req.n)
    width, height = st.parse_size(req.size)
    fmt = req.output_format or "png"
    if req.stream:
        return answer(st.stream_image(request, "generate", "image_generation", req, fmt, lambda on_step: tasks.generate_job(
            req.prompt, width=width, height=height, think=req.think, seed=req.seed, knobs=image_knobs(req),
            on_step=on_step)), ignored)
    fn = tasks.generate_job(req.prompt, width=width, height=height, n=req.n, think=req.think, seed=req.seed,
                            knobs=image_knobs(req))
    outs = await st.run_job(request, "generate", fn)
    st.metrics.inc("bagel_images_generated_total", len(outs))
    return answer(await run_in_threadpool(images_answer, st, request, outs, fmt, req, "t2i"), ignored)

@router.post("/v1/images/edits", openapi_extra=body_schema(ImageEditJSONRequest))
async def images_edits(request: Request) -> Any:
    st = state(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        req, images, ignored = await read_edit_form(request, st)
    elif ctype in ("application/json", ""):
        req, ignored = await parse_json(ImageEditJSONRequest, await request.body(), st.settings.strict)
        st.check_image_count(len(req.image), "image")
        images = []
        for i, ref in enumerate(req.image):
            images.append(await run_in_threadpool(read_image_ref, ref, st.settings, f"image[{i}]"))
    else:
        raise APIError(415, f"send the edit as multipart/form-data (OpenAI style) or JSON, not {ctype!r}",
                       code="unsupported_media_type")
    st.check_model(req.model)
    st.check_n(req.n)
    fmt = req.output_format or "png"
    if req.stream:
        return answer(st.stream_image(request, "edit", "image_edit", req, fmt, lambda on_step: tasks.edit_job(
            images, req.prompt, think=req.think, seed=req.seed, knobs=image_knobs(req), on_step=on_step)), ignored)
    fn = tasks.edit_job(images, req.prompt, n=req.n, think=req.think, seed=req.seed, knobs=image_knobs(req))
    outs = await st.run_job(request, "edit", fn)
    st.metrics.inc("bagel_images_generated_total", len(outs))
    return answer(await run_in_threadpool(images_answer, st, request, outs, fmt, req, "edit"), ignored)

@router.get(IMAGE_FILES + "{name}")
async def image_file(name: str, request: Request) -> Response:
    """An image answered as ``response_format: "url"`` (kept for ``--url-ttl`` seconds)."""
    found = state(request).images.get(name)
    if found is None:
        raise APIError(404, "no such image: its URL has expired (bagel serve --url-ttl) or was never issued",
                       code="not_found")
    return Response(found[0], media_type=found[1], headers={"Cache-Control": "private, max-age=3600"})

async def read_edit_form(request: Request, st: ServerState) -> tuple[ImageEditRequest, list[Any], list[str]]:
    try:
        form = await request.form(max_files=st.settings.max_images + 1, max_fields=256,
                                  max_part_size=st.settings.max_body_bytes)
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
                fields.setdefault(name, []).extend(split_list(value))
            elif key.endswith("[]"):
                fields.setdefault(name, []).append(value)
            elif name in fields:
                raise bad_request(f"form field '{name}' is given more than once", name)
            else:
                fields[name] = value
        if not uploads:
            raise bad_request("missing required parameter(s): 'image' (one or several image files)", "image",
                              code="missing_parameter")
        st.check_image_count(len(uploads), "image")
        fields, ignored = compat.normalize_fields(fields, st.settings.strict)
        try:
            req = ImageEditRequest.model_validate(fields, strict=False)
        except ValidationError as e:
            raise validation_error(e) from None
        images = []
        for i, (_key, value) in enumerate(uploads):
            what = f"image[{i}]" if len(uploads) > 1 else "image"
            if isinstance(value, UploadFile):
                raw = await value.read()
                images.append(await run_in_threadpool(decode_image, raw, st.settings, what))
            else:
                images.append(await run_in_threadpool(read_image_ref, value, st.settings, what))
        return req, images, ignored
    finally:
        await form.close()

@router.post("/v1/chat/completions", openapi_extra=body_schema(ChatCompletionRequest))
async def chat_completions(request: Request) -> Any:
    st = state(request)
    req: ChatCompletionRequest
    req, ignored = await parse_json(ChatCompletionRequest, await request.body(), st.settings.strict)
    st.check_model(req.model)
    n = req.n or 1
    modality = (req.modalities or ["text"])[0]
    # Count images before decoding any of them.
    refs = [p.image_url.url for m in req.messages for p in m.content if p.type == "image_url"]
    st.check_image_count(len(refs), "messages")
    turns = []
    for mi, m in enumerate(req.messages):
        imgs, texts = [], []
        for pi, p in enumerate(m.content):
            if p.type == "image_url":
                what = f"messages[{mi}].content[{pi}].image_url"
                imgs.append(await run_in_threadpool(read_image_ref, p.image_url.url, st.settings, what))
            elif p.text and p.text.strip():
                texts.append(p.text)
        turns.append((imgs, "\n".join(texts)))
    conv = tasks.conversation_from_turns(turns)
    if not any(isinstance(x, str) for x in conv.items):
        raise bad_request("the messages hold no text: give a prompt or a question", "messages")
    text_kw = sampling(req)
    if modality == "text":
        stray = [name for name in IMAGE_KNOBS + ("max_think_token_n", "size", "output_format")
                 if getattr(req, name) is not None]
        if n > 1 and req.stream:
            raise bad_request("stream: true writes one answer (n = 1)", "n")
        st.check_n(n)
        if stray:
            raise bad_request(f"parameter(s) {', '.join(map(repr, stray))} only apply when modalities is "
                              '["image"]', stray[0])
        limit = one_of(req, ("max_new_tokens", "max_completion_tokens", "max_tokens"))
        if limit is not None:
            text_kw["max_new_tokens"] = limit
        text_kw.update({k: getattr(req, k) for k in ("top_p", "top_k", "stop") if getattr(req, k) is not None})
        if req.stream:
            return answer(st.stream_chat(request, req, conv, text_kw), ignored)
        fn = tasks.text_job(conv, think=req.think, seed=req.seed, text_kw=text_kw, n=n)
        outs = await st.run_job(request, "chat", fn)
        choices = [chat_choice(i, out, req.think) for i, out in enumerate(outs)]
    else:
        stray = [name for name in ("top_p", "top_k", "stop") if getattr(req, name) is not None] + \
            (["n"] if n > 1 else [])
        if stray:
            raise bad_request(f"parameter(s) {', '.join(map(repr, stray))} apply to text answers only", stray[0])
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
        width, height = st.parse_size(req.size) if req.size is not None else (None, None)
        if width is None and (simple is None or not simple[0]):
            width, height = st.parse_size(None)
        knobs = req.given(IMAGE_KNOBS)
        knobs.update({k: v for k, v in text_kw.items() if k in THINK_KNOBS})
        limit = one_of(req, ("max_think_token_n", "max_completion_tokens", "max_tokens"))
        if limit is not None:
            knobs["max_think_token_n"] = limit
        fn = tasks.image_job(conv, width=width, height=height, think=req.think, seed=req.seed, knobs=knobs)
        out = await st.run_job(request, "chat_image", fn)
        if out.image is None:
            raise APIError(500, "the model returned no image", code="internal_error")
        st.metrics.inc("bagel_images_generated_total")
        fmt = req.output_format or "png"
        texts = [x for x in conv.items if isinstance(x, str)]
        meta = describe("edit" if conv.images else "t2i", texts[-1] if texts else None, out, st.names[0])
        url = await run_in_threadpool(data_url, out.image, fmt, meta)
        message: dict[str, Any] = {"role": "assistant", "content": "",
                                   "images": [{"type": "image_url", "image_url": {"url": url}}]}
        if req.think:
            message["reasoning_content"] = out.text or ""
        outs = [out]
        choices = [{"index": 0, "message": message, "logprobs": None,
                    "finish_reason": getattr(out, "finish_reason", None) or "stop"}]
    return answer({
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model or st.names[0],
        "choices": choices,
        "usage": total_usage(outs),
        "seed": getattr(outs[0], "seed", None),
        "timings": dict(getattr(outs[0], "timings", {}) or {}),
    }, ignored)


def chat_choice(index: int, out: Any, think: bool) -> dict[str, Any]:
    reasoning, text = split_think(out.text) if think else (None, out.text or "")
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if think:
        message["reasoning_content"] = reasoning or ""  # think asked: always report it, even when empty
    return {"index": index, "message": message, "logprobs": None,
            "finish_reason": getattr(out, "finish_reason", None) or "stop"}


def total_usage(outs: list[Any]) -> dict[str, int] | None:
    """Usage of all the choices: the prompt counted once (OpenAI's way), the completions summed."""
    parts = [usage(o) for o in outs]
    if any(p is None for p in parts):
        return None
    completion = sum(p["completion_tokens"] for p in parts)
    return {"prompt_tokens": parts[0]["prompt_tokens"], "completion_tokens": completion,
            "total_tokens": parts[0]["prompt_tokens"] + completion}
