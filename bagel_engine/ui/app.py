"""The gradio app: text to image, editing (one or several images), understanding and chat.

Every control starts at the official app's default for its tab. All work goes through the same
model worker as the HTTP API (one job at a time, bounded queue), and only through the public
pipeline API.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hmac
from pathlib import Path
from typing import Any

import gradio as gr

from bagel_engine import image_input
from bagel_engine.engine_protocol import Pipeline
from bagel_engine.image_input import ImageInputError

from bagel_engine.params import (
    RENORM_TYPES,
    THINK_TOKENS_DEFAULT,
    ImageParams,
    TaskDefaults,
    TextParams,
)
from bagel_engine.serve import tasks
from bagel_engine.serve._engine import INPUT_ERRORS
from bagel_engine.serve.errors import internal_error
from bagel_engine.serve.images import image_policy
from bagel_engine.serve.replicas import wants_previews
from bagel_engine.serve.settings import ServeSettings
from bagel_engine.serve.worker import JobCancelled, ModelWorker, QueueFull, WorkerStopped
from bagel_engine.think_text import split_think
from bagel_engine.ui.strings import Words

TEXT_DEFAULTS = TextParams()
CSS = """
#bagel-header h1 { margin-bottom: 0; }
"""


# -- running a job from a gradio handler ------------------------------------------------------
def _submit(worker: ModelWorker, kind: str, fn: Any, w: Words) -> Any:
    try:
        return worker.submit(kind, fn)
    except QueueFull as e:
        raise gr.Error(w("The model is busy ({reason}).", reason=e)) from None
    except WorkerStopped as e:
        raise gr.Error(str(e)) from None


def _poll(job: Any, worker: ModelWorker, progress: Any, desc: str, w: Words) -> Any:
    """Wait for ``job``, reporting its steps to the progress bar; a generator that yields every 0.1 s
    while the job runs (so a streaming handler can show what it has) and returns the job's result."""
    last = None
    progress(0, desc=w("waiting for the model") if worker.busy else desc)
    while True:
        try:
            return job.future.result(timeout=0.1)
        except concurrent.futures.TimeoutError:
            if job.total and (job.step, job.total) != last:
                last = (job.step, job.total)
                progress(last, desc=desc, unit="steps")
            elif job.started is not None and last is None:
                last = (0, 0)
                progress(0, desc=desc)
        except INPUT_ERRORS as e:
            raise gr.Error(str(e)) from None
        except JobCancelled as e:
            raise gr.Error(w("cancelled ({reason})", reason=e)) from None
        except Exception as e:  # noqa: BLE001 - show the failure (not its text: the log has it), keep the app up
            raise gr.Error(internal_error(e)[0].message) from None
        yield


def _stream_text(worker: ModelWorker, kind: str, conv: Any, think: bool, seed: Any, text_kw: dict, progress: Any,
                 w: Words):
    """Run a text job and yield ``(plan, answer, out)`` as the text is written (``out`` is None until the
    end, then the finished output)."""
    written: list[str] = []  # appended by the worker thread, read here
    fn = tasks.text_job(conv, think=think, seed=seed, text_kw=text_kw, on_text=written.append)
    poll = _poll(_submit(worker, kind, fn, w), worker, progress, w("answering"), w)
    shown = 0
    while True:
        try:
            next(poll)
        except StopIteration as done:
            out = done.value
            plan, answer = split_think(out.text) if think else (None, out.text or "")
            yield plan or "", answer, out
            return
        if len(written) != shown:
            shown = len(written)
            text = "".join(written[:shown])
            plan, answer = split_think(text) if think else (None, text)
            yield plan or "", answer, None


def _seed(value: Any) -> int | None:
    if value is None or value == "":
        return None
    seed = int(value)
    return None if seed < 0 else seed


def _info(outs: list[Any], w: Words) -> str:
    parts = []
    for out in outs:
        total = (getattr(out, "timings", None) or {}).get("total_s")
        parts.append(w("seed {seed}", seed=out.seed) + (f" · {total:.2f} s" if total else ""))
    return " | ".join(parts)


def _knobs(w: Words, cfg_text_scale, cfg_img_scale, lo, hi, renorm_type, renorm_min, shift, steps, think_tokens,
           do_sample, temperature) -> dict[str, Any]:
    if lo > hi:
        raise gr.Error(w("CFG interval: start {lo} is above end {hi}", lo=lo, hi=hi))
    return dict(cfg_text_scale=float(cfg_text_scale), cfg_img_scale=float(cfg_img_scale),
                cfg_interval=(float(lo), float(hi)), cfg_renorm_type=str(renorm_type),
                cfg_renorm_min=float(renorm_min), timestep_shift=float(shift), num_timesteps=int(steps),
                max_think_token_n=int(think_tokens), do_sample=bool(do_sample), text_temperature=float(temperature))


def _gallery_paths(value: Any) -> list[str]:
    paths = []
    for item in value or []:
        media = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(media, dict):
            media = media.get("path")
        if media:
            paths.append(str(media))
    return paths


def _open_images(paths: list[str], settings: ServeSettings, w: Words) -> list[Any]:
    if len(paths) > settings.max_images:
        raise gr.Error(w("{n} images is above the limit of {limit}", n=len(paths), limit=settings.max_images))
    # the uploads are gradio's own temporary files: read wherever they are, under the server's size limits
    policy = dataclasses.replace(image_policy(settings), local_roots=None)  # still no paths in messages
    images = []
    for i, p in enumerate(paths):
        try:
            images.append(image_input.read_image(Path(p), policy, f"image {i + 1}"))
        except ImageInputError as e:
            raise gr.Error(str(e)) from None
    return images


# -- the controls ------------------------------------------------------------------------------
def _image_knob_controls(prefix: str, d: ImageParams, w: Words) -> list[Any]:
    with gr.Accordion(w("Image generation settings"), open=False):
        with gr.Row():
            text_scale = gr.Slider(0.0, 8.0, value=d.cfg_text_scale, step=0.1, label=w("CFG text scale"),
                                   info=w("cfg_text_scale: how strongly the prompt guides the image"),
                                   elem_id=f"{prefix}-cfg-text")
            img_scale = gr.Slider(0.0, 4.0, value=d.cfg_img_scale, step=0.1, label=w("CFG image scale"),
                                  info=w("cfg_img_scale: how closely the input image(s) are kept"),
                                  elem_id=f"{prefix}-cfg-img")
        with gr.Row():
            lo = gr.Slider(0.0, 1.0, value=d.cfg_interval[0], step=0.05, label=w("CFG interval start"),
                           info=w("cfg_interval[0]: guidance applies from this point of the schedule"),
                           elem_id=f"{prefix}-cfg-lo")
            hi = gr.Slider(0.0, 1.0, value=d.cfg_interval[1], step=0.05, label=w("CFG interval end"),
                           info=w("cfg_interval[1]"), elem_id=f"{prefix}-cfg-hi")
        with gr.Row():
            renorm_type = gr.Dropdown(list(RENORM_TYPES), value=d.cfg_renorm_type, label=w("CFG renorm type"),
                                      info=w("cfg_renorm_type (text_channel suits edits)"),
                                      elem_id=f"{prefix}-renorm-type")
            renorm_min = gr.Slider(0.0, 1.0, value=d.cfg_renorm_min, step=0.05, label=w("CFG renorm min"),
                                   info=w("cfg_renorm_min: 1.0 disables renorm"), elem_id=f"{prefix}-renorm-min")
        with gr.Row():
            shift = gr.Slider(0.5, 6.0, value=d.timestep_shift, step=0.1, label=w("Timestep shift"),
                              info=w("timestep_shift: higher spends more steps on layout"),
                              elem_id=f"{prefix}-shift")
            steps = gr.Slider(2, 200, value=d.num_timesteps, step=1, label=w("Timesteps"),
                              info=w("num_timesteps: schedule points (N points, N-1 denoising steps)"),
                              elem_id=f"{prefix}-steps")
    return [text_scale, img_scale, lo, hi, renorm_type, renorm_min, shift, steps]


def _text_controls(prefix: str, tokens_default: int, tokens_label: str, w: Words) -> list[Any]:
    with gr.Accordion(w("Text decoding settings"), open=False):
        with gr.Row():
            tokens = gr.Slider(1, 4096, value=tokens_default, step=1, label=tokens_label,
                               elem_id=f"{prefix}-tokens")
            do_sample = gr.Checkbox(value=TEXT_DEFAULTS.do_sample, label=w("Sample (do_sample)"),
                                    info=w("off: greedy decoding"), elem_id=f"{prefix}-sample")
            temperature = gr.Slider(0.05, 2.0, value=TEXT_DEFAULTS.text_temperature, step=0.05,
                                    label=w("Temperature (text_temperature)"), elem_id=f"{prefix}-temperature")
    return [tokens, do_sample, temperature]


def _seed_box(prefix: str, w: Words) -> Any:
    return gr.Number(value=-1, precision=0, label=w("Seed (-1: random)"), minimum=-1, elem_id=f"{prefix}-seed")


# -- the app -----------------------------------------------------------------------------------
def build_ui(worker: ModelWorker, pipe: Pipeline, settings: ServeSettings | None = None) -> gr.Blocks:
    settings = settings or ServeSettings()
    cfg = pipe.config
    step = int(cfg.latent_downsample)
    max_side = int(cfg.max_image_side)
    defaults = getattr(pipe, "task_defaults", None) or TaskDefaults()  # the model's own, else the app's
    default_w, default_h = (max(step, min(side, max_side) // step * step) for side in (defaults.width, defaults.height))
    name = str(getattr(pipe, "model_name", "") or "BAGEL")
    w = Words(settings.ui_lang)

    # -- handlers ----------------------------------------------------------------------------
    def _draw(make_job, kind: str, think: Any, progress: Any):
        """Run an image job, yielding (picture, think text, info): the picture forming (the predicted clean
        image, decoded about every fifth of the way), then the result."""
        previews: list[Any] = []  # appended by the worker thread

        def on_step(preview: Any) -> None:
            if tasks.fifth_step(preview.step, preview.total):
                previews.append(preview.image())
        wants_previews(on_step, tasks.fifth_step)  # a replica on Ray decodes only those steps

        poll = _poll(_submit(worker, kind, make_job(on_step), w), worker, progress, w("denoising"), w)
        shown = 0
        while True:
            try:
                next(poll)
            except StopIteration as done:
                outs = done.value
                yield outs[0].image, (outs[0].text or "") if think else "", _info(outs, w)
                return
            if len(previews) != shown:
                shown = len(previews)
                yield previews[shown - 1], "", w("denoising... (preview {n}: the picture the current step predicts)",
                                                 n=shown)

    def on_generate(prompt, width, height, think, seed, *rest, progress=gr.Progress()):
        if not (prompt or "").strip():
            raise gr.Error(w("Write a prompt first."))
        knobs = _knobs(w, *rest)
        yield from _draw(lambda on_step: tasks.generate_job(
            prompt, width=int(width), height=int(height), think=bool(think), seed=_seed(seed), knobs=knobs,
            on_step=on_step), "ui_generate", think, progress)

    def on_edit(gallery, prompt, think, seed, *rest, progress=gr.Progress()):
        paths = _gallery_paths(gallery)
        if not paths:
            raise gr.Error(w("Add one or more input images first."))
        if not (prompt or "").strip():
            raise gr.Error(w("Write an instruction first."))
        images = _open_images(paths, settings, w)
        knobs = _knobs(w, *rest)
        yield from _draw(lambda on_step: tasks.edit_job(images, prompt, think=bool(think), seed=_seed(seed),
                                                        knobs=knobs, on_step=on_step), "ui_edit", think, progress)

    def on_understand(gallery, question, think, seed, tokens, do_sample, temperature, progress=gr.Progress()):
        if not (question or "").strip():
            raise gr.Error(w("Ask a question first."))
        images = _open_images(_gallery_paths(gallery), settings, w)
        conv = tasks.conversation_from_turns([(images, question)])
        text_kw = dict(max_new_tokens=int(tokens), do_sample=bool(do_sample), text_temperature=float(temperature))
        for plan, answer, out in _stream_text(worker, "ui_understand", conv, bool(think), _seed(seed), text_kw,
                                              progress, w):
            yield answer, plan, _info([out], w) if out is not None else w("answering...")

    def on_chat(message, history, turns, think, seed, tokens, do_sample, temperature, progress=gr.Progress()):
        message = message or {}
        text = (message.get("text") or "").strip()
        files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
        if not text:
            raise gr.Error(w("Write a message first."))
        images = _open_images([f for f in files if f], settings, w)
        new_turns = list(turns or []) + [(images, text)]
        conv = tasks.conversation_from_turns(new_turns)
        text_kw = dict(max_new_tokens=int(tokens), do_sample=bool(do_sample), text_temperature=float(temperature))
        history = list(history or [])
        for f in files:
            history.append({"role": "user", "content": {"path": f}})
        history.append({"role": "user", "content": text})
        empty = {"text": "", "files": []}
        try:
            for plan, answer, out in _stream_text(worker, "ui_chat", conv, bool(think), _seed(seed), text_kw,
                                                  progress, w):
                shown = list(history)
                if plan:
                    shown.append({"role": "assistant", "content": plan, "metadata": {"title": w("Think")}})
                shown.append({"role": "assistant", "content": answer})
                if out is None:  # the answer so far; the box waits (a message typed now would be lost)
                    yield shown, turns, gr.update(value=empty, interactive=False)
                else:
                    yield shown, new_turns + [([], answer)], gr.update(value=empty, interactive=True)
        except gr.Error:
            yield history, turns, gr.update(value=message, interactive=True)  # the message back, to retry
            raise

    # -- layout ------------------------------------------------------------------------------
    # delete_cache: uploads and results gradio keeps on disk go after an hour (checked every 30 min)
    with gr.Blocks(title=f"BAGEL · {name}", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(w("# BAGEL\nModel: `{name}` · images up to {max_side}px per side, in steps of {step}px",
                      name=name, max_side=max_side, step=step), elem_id="bagel-header")
        with gr.Tabs():
            with gr.Tab(w("Text to image"), id="t2i", elem_id="tab-t2i"):
                with gr.Row():
                    with gr.Column():
                        t2i_prompt = gr.Textbox(label=w("Prompt"), lines=3, elem_id="t2i-prompt",
                                                placeholder=w("A red fox in the snow, watercolor"))
                        with gr.Row():
                            t2i_w = gr.Slider(step, max_side, value=default_w, step=step, label=w("Width"),
                                              elem_id="t2i-width")
                            t2i_h = gr.Slider(step, max_side, value=default_h, step=step, label=w("Height"),
                                              elem_id="t2i-height")
                        with gr.Row():
                            t2i_think = gr.Checkbox(False, label=w("Think first (show the plan)"), elem_id="t2i-think")
                            t2i_seed = _seed_box("t2i", w)
                        t2i_knobs = _image_knob_controls("t2i", defaults.t2i, w)
                        t2i_text = _text_controls("t2i", THINK_TOKENS_DEFAULT, w("Think tokens (max_think_token_n)"), w)
                        t2i_run = gr.Button(w("Generate"), variant="primary", elem_id="t2i-run")
                    with gr.Column():
                        t2i_out = gr.Image(label=w("Result"), type="pil", format="png", interactive=False, height=420,
                                           elem_id="t2i-output")
                        t2i_plan = gr.Textbox(label=w("Think text"), lines=5, interactive=False, elem_id="t2i-plan")
                        t2i_info = gr.Textbox(label=w("Seed and time"), interactive=False, elem_id="t2i-info")
                t2i_inputs = [t2i_prompt, t2i_w, t2i_h, t2i_think, t2i_seed, *t2i_knobs, *t2i_text]
                t2i_run.click(on_generate, t2i_inputs, [t2i_out, t2i_plan, t2i_info], api_name="generate")
                t2i_prompt.submit(on_generate, t2i_inputs, [t2i_out, t2i_plan, t2i_info], api_name=False)

            with gr.Tab(w("Edit"), id="edit", elem_id="tab-edit"):
                with gr.Row():
                    with gr.Column():
                        edit_images = gr.Gallery(label=w("Input images (one or several; the result takes the "
                                                         "last one's size)"), type="filepath", interactive=True,
                                                 file_types=["image"], columns=3, height=260,
                                                 elem_id="edit-images")
                        edit_prompt = gr.Textbox(label=w("Instruction"), lines=2, elem_id="edit-prompt",
                                                 placeholder=w("Make it night time"))
                        with gr.Row():
                            edit_think = gr.Checkbox(False, label=w("Think first (show the plan)"), elem_id="edit-think")
                            edit_seed = _seed_box("edit", w)
                        edit_knobs = _image_knob_controls("edit", defaults.edit, w)
                        edit_text = _text_controls("edit", THINK_TOKENS_DEFAULT, w("Think tokens (max_think_token_n)"), w)
                        edit_run = gr.Button(w("Edit"), variant="primary", elem_id="edit-run")
                    with gr.Column():
                        edit_out = gr.Image(label=w("Result"), type="pil", format="png", interactive=False, height=420,
                                            elem_id="edit-output")
                        edit_plan = gr.Textbox(label=w("Think text"), lines=5, interactive=False, elem_id="edit-plan")
                        edit_info = gr.Textbox(label=w("Seed and time"), interactive=False, elem_id="edit-info")
                edit_run.click(on_edit, [edit_images, edit_prompt, edit_think, edit_seed, *edit_knobs, *edit_text],
                               [edit_out, edit_plan, edit_info], api_name="edit")

            with gr.Tab(w("Understand"), id="understand", elem_id="tab-understand"):
                with gr.Row():
                    with gr.Column():
                        und_images = gr.Gallery(label=w("Images (optional)"), type="filepath", interactive=True,
                                                file_types=["image"], columns=3, height=260,
                                                elem_id="und-images")
                        und_question = gr.Textbox(label=w("Question"), lines=2, elem_id="und-question",
                                                  placeholder=w("What is in this picture?"))
                        with gr.Row():
                            und_think = gr.Checkbox(False, label=w("Think first"), elem_id="und-think")
                            und_seed = _seed_box("und", w)
                        und_text = _text_controls("und", defaults.understand_tokens, w("Max new tokens"), w)
                        und_run = gr.Button(w("Ask"), variant="primary", elem_id="und-run")
                    with gr.Column():
                        und_answer = gr.Textbox(label=w("Answer"), lines=6, interactive=False, elem_id="und-answer")
                        und_plan = gr.Textbox(label=w("Think text"), lines=5, interactive=False, elem_id="und-plan")
                        und_info = gr.Textbox(label=w("Seed and time"), interactive=False, elem_id="und-info")
                und_run.click(on_understand, [und_images, und_question, und_think, und_seed, *und_text],
                              [und_answer, und_plan, und_info], api_name="understand")

            with gr.Tab(w("Chat"), id="chat", elem_id="tab-chat"):
                chat_turns = gr.State([])
                chatbot = gr.Chatbot(label=w("Conversation"), height=420, elem_id="chat-log")
                chat_box = gr.MultimodalTextbox(placeholder=w("Message (attach images with the clip)"),
                                                file_types=["image"], file_count="multiple", elem_id="chat-input")
                with gr.Row():
                    chat_think = gr.Checkbox(False, label=w("Think first"), elem_id="chat-think")
                    chat_seed = _seed_box("chat", w)
                    chat_clear = gr.Button(w("New conversation"), elem_id="chat-clear")
                chat_text = _text_controls("chat", defaults.chat_tokens, w("Max new tokens"), w)
                chat_box.submit(on_chat, [chat_box, chatbot, chat_turns, chat_think, chat_seed, *chat_text],
                                [chatbot, chat_turns, chat_box], api_name="chat")
                chat_clear.click(lambda: ([], [], {"text": "", "files": []}), None, [chatbot, chat_turns, chat_box],
                                 api_name=False)
    demo.bagel_css = CSS  # type: ignore[attr-defined]
    return demo


def ui_auth(settings: ServeSettings):
    """gradio auth: any user name, the API key as the password (None when no key is set)."""
    if not settings.api_key:
        return None
    key = settings.api_key

    def check(username: str, password: str) -> bool:
        return hmac.compare_digest((password or "").encode(), key.encode())

    return check


def launch_ui(worker: ModelWorker, pipe: Pipeline, settings: ServeSettings, *, host: str = "127.0.0.1",
              port: int = 7860, prevent_thread_lock: bool = False, share: bool = False) -> Any:
    """Serve the UI on ``host:port``; ``share``: also through a temporary public gradio.live link."""
    demo = build_ui(worker, pipe, settings)
    demo.queue()
    return demo.launch(server_name=host, server_port=port, auth=ui_auth(settings), share=share,
                       auth_message="Log in with any user name and the API key as the password.",
                       show_error=True, footer_links=[], max_file_size=settings.max_body_bytes, css=CSS,
                       prevent_thread_lock=prevent_thread_lock, quiet=False)
