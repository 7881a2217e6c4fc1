"""The engine: a request's lifecycle as numbered stages, and a scheduler that steps many requests together.

A :class:`Request` goes through

1. **validate**: its parameters, sizes and limits are checked before any work;
2. **prefill**: its three guidance contexts are built (texts, ViT and VAE images, as the official
   ``interleave_inference`` does);
3. **think / answer**: text is decoded a token per tick (the answer, or the think text that then
   joins the context);
4. **noise**: the starting latent is drawn from the request's seed (or given);
5. **denoise**: one Euler step per tick;
6. **decode**: the latent through the VAE decoder, or the tokens into text.

Every tick runs ONE decoder forward over the next token of every request in stage 3 and ONE over
the next denoising step of every request in stage 5, whatever their sizes, guidance settings and
steps (``decode_step``, ``denoise_step``); prefill and VAE decoding run between ticks. Each
request's result is the one it gets alone: its random draws come from its own seed, and its
blocks attend only to its own contexts.

``Engine.run(requests)`` steps the given requests together until they are done, in the calling
thread. After ``Engine.start(max_batch)``, a scheduler thread owns the model: ``run`` from any
thread hands the requests to it, and requests of different callers (a server's concurrent clients)
join and leave the running batch at step boundaries: a newcomer starts within one step.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from PIL import Image

from bagel_engine.model.attention import check_backend, use_backend
from bagel_engine.model.autoencoder import AutoEncoder
from bagel_engine.model.bagel import Bagel
from bagel_engine.model.config import ModelConfig
from bagel_engine.params import BagelInputError, ImageParams, Limits, TextParams, first_stop, held_back
from bagel_engine.runtime import image_transforms as transforms
from bagel_engine.runtime.context import Context, ContextBuilder, PreparedImage
from bagel_engine.runtime.image_generation import (GuidanceContexts, ImageDenoise, denoise_step,
                                                   denoise_step_cfg_parallel)
from bagel_engine.runtime.text_decoding import TextDecode, decode_step
from bagel_engine.runtime.tokenizer import BagelTokenizer
from bagel_engine.runtime.vae_tiling import Tiling, decode_tiled, encode_tiled
from bagel_engine.think_text import simple_think

log = logging.getLogger("bagel_engine")

GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> image here"
)
VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> answer here"
)

ImageInput = Image.Image | str | os.PathLike | bytes
StepCallback = Callable[[int, int], None]


@dataclass
class BagelOutput:
    text: str | None = None  # the answer; for image output with think, the think text
    image: Image.Image | None = None
    latents: torch.Tensor | None = None  # (z_channels, H/d, W/d): what the VAE decoder received
    seed: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # text answers: tokens of the context the answer was decoded from, tokens written, and why it
    # stopped ("stop": the end token; "length": max_new_tokens ran out), as OpenAI's usage reports them
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


@dataclass
class StepPreview:
    """What one denoising step predicts for one image of the call (``index``): the clean latent
    ``x0 = x_t - t v`` and, on request, that latent through the VAE decoder (one VAE decode per call:
    ask for a few, e.g. every tenth step). Given to ``on_step`` after each step."""

    step: int
    total: int
    index: int
    tokens: torch.Tensor = field(repr=False)  # (h*w, p*p*C) latent tokens
    _unpatchify: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    _decode: Callable[[torch.Tensor], Image.Image] = field(repr=False)

    def latent(self) -> torch.Tensor:
        """(z_channels, H/d, W/d): the predicted clean latent, as the VAE decoder takes it."""
        return self._unpatchify(self.tokens)

    def image(self) -> Image.Image:
        """The predicted clean latent decoded: the picture as this step sees it."""
        return self._decode(self.latent())


@dataclass
class Request:
    """One job for the engine: an ordered list of texts and images and what to make of it.

    ``understanding_output``: answer in text (else draw an image); ``think``: decode think text first.
    ``image_shape`` (height, width) for text to image (an edit takes its last input image's size).
    ``seed`` drives every random draw of the request (None: a fresh one); ``noise`` replaces the
    starting latent. ``callback(k, total)`` after each denoising step or token (raise in it to stop
    the request); ``on_text(delta)`` with each new piece of text; ``on_step(preview)`` after each
    denoising step. ``index``: the request's place in its caller's list (given to previews).
    ``negative_prompt``: text added to the text-unconditional guidance context (what the picture should
    move away from; None: that context holds no text, as in the official code).
    ``think_contexts``: which guidance contexts think mode builds for an image: ``"app"`` as
    ``interleave_inference`` does, or ``"eval"`` as the official benchmark scripts do: the think text joins
    the image-unconditional context too (``gen_images_gedit.py``, ``gen_images_mp_{imgedit,kris,rise}.py``;
    Bagel#214), and for text to image the text-unconditional context holds nothing, not the think system
    prompt (``gen_images_mp_wise.py``).
    """

    inputs: Sequence[str | ImageInput | PreparedImage]
    understanding_output: bool = False
    think: bool = False
    text: TextParams = field(default_factory=TextParams)
    image: ImageParams = field(default_factory=ImageParams)
    image_shape: tuple[int, int] = (1024, 1024)
    seed: int | None = None
    noise: torch.Tensor | None = None
    sample_posterior: bool = True
    callback: StepCallback | None = None
    on_text: Callable[[str], None] | None = None
    on_step: Callable[[StepPreview], None] | None = None
    trace: dict | None = None
    index: int = 0
    negative_prompt: str | None = None
    think_contexts: str = "app"
    simple_think: bool = False  # WISE's option: only the think text after </think> conditions the picture
    size_from: int = -1  # the input image whose (resized) size an edit takes: the last (the app) or e.g. 0, the first

    def __post_init__(self) -> None:
        if self.think_contexts not in THINK_CONTEXTS:
            raise BagelInputError(f"think_contexts must be one of {', '.join(THINK_CONTEXTS)}, not {self.think_contexts!r}")


THINK_CONTEXTS = ("app", "eval")


def _new_seed() -> int:
    return random.SystemRandom().randrange(2**31)


class _Active:
    """A request in the engine: where it is in its stages and what it has made so far."""

    def __init__(self, request: Request, builder: ContextBuilder):
        self.request = request
        self.builder = builder
        self.t_start = time.perf_counter()
        self.seed = _new_seed() if request.seed is None else int(request.seed)
        self.cpu_gen = torch.Generator("cpu").manual_seed(self.seed)
        self.sample_gen: torch.Generator | None = None
        self.gen = self.cfg_text = self.cfg_img = Context()
        self.height = self.width = 0
        self.stage = "validate"
        self.prefill = None  # the prefill's generator (``Engine.begin``)
        self.decoding: TextDecode | None = None
        self.ids: list[int] = []
        self.shown = ""
        self.calls = 0
        self.stopped = False  # an answer that ended on a stop string
        self.denoising: ImageDenoise | None = None
        self.error: BaseException | None = None
        self.t_stage = 0.0
        self.out = BagelOutput(seed=self.seed)
        self.future: concurrent.futures.Future | None = None
        self.group: _Group | None = None  # the scheduler: the requests of the same call

    @property
    def finished(self) -> bool:
        return self.stage == "done" or self.error is not None

    @property
    def rows(self) -> int:
        """Rows this request puts into a step's forward at most (every guidance branch of its image, or the
        one token of its answer): what the scheduler's token budget counts."""
        if self.stage == "image" and self.denoising is not None:
            return self.denoising.num_branches * (self.denoising.n + 2)
        return 1 if self.stage == "text" else 0

    def guard(self, fn: Callable | None) -> Callable | None:
        """``fn`` as the batched steps call it: an exception it raises stops this request only."""
        if fn is None:
            return None

        def call(*args):
            if self.error is None:
                try:
                    fn(*args)
                except BaseException as e:  # noqa: BLE001 - handed back to this request's caller
                    self.error = e
        return call

    def output(self) -> BagelOutput:
        self.out.timings["total_s"] = time.perf_counter() - self.t_start
        return self.out


class Engine:
    """Owns the modules and runs requests; see the module docstring for the stages and the scheduler."""

    def __init__(self, model: Bagel, vae: AutoEncoder, tokenizer: BagelTokenizer, config: ModelConfig, *,
                 device: torch.device, official_numerics: bool = False, attention: str = "auto"):
        self.model, self.vae, self.tokenizer, self.config = model, vae, tokenizer, config
        self.device, self.official_numerics = device, official_numerics
        self.attention = check_backend(attention)  # this pipeline's attention backend (model.attention)
        self.limits = Limits()  # what one request may ask for (a server sets its own)
        self.decoder_fn: Callable | None = None  # a compiled decoder (``BagelPipeline.compile``)
        self.vae_tiling: Tiling | None = None  # encode / decode large images in tiles (``vae_tiling``)
        self.vae_group = None  # VAE patch parallel: the ranks the tiles of inputs and results are spread over
        self.cfg_parallel = None  # a process group: each step's guidance branches spread over its ranks
        # every rank that runs the same requests in step (CFG-parallel, tensor parallel): they agree on drawn seeds
        self.lockstep = None
        self._scheduler: Scheduler | None = None
        self.ticks = 0  # batched steps run (text and image forwards count once each)

    # ------------------------------------------------------------------------------ the scheduler
    def start(self, max_batch: int = 8, max_step_tokens: int | None = None) -> "Engine":
        """Run requests from now on in a scheduler thread that batches concurrent callers' requests: at most
        ``max_batch`` at once, and (when given) at most ``max_step_tokens`` rows in one step's forward."""
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_step_tokens is not None and max_step_tokens < 1:
            raise ValueError("max_step_tokens must be >= 1")
        if self.lockstep is not None:
            raise BagelInputError("CFG-parallel and tensor parallel run requests that every rank is given (the CLI, the "
                                  "Python API under torchrun), not a scheduler's: a server with them is not supported yet")
        if self._scheduler is None or not self._scheduler.running:
            self._scheduler = Scheduler(self, max_batch, max_step_tokens).start()
        else:
            self._scheduler.max_batch, self._scheduler.max_step_tokens = max_batch, max_step_tokens
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        if self._scheduler is not None:
            self._scheduler.stop(timeout)
            self._scheduler = None

    @property
    def batching(self) -> bool:
        return self._scheduler is not None and self._scheduler.running

    @property
    def active_requests(self) -> int:
        return self._scheduler.active_count if self._scheduler is not None else 0

    @torch.inference_mode()
    def run(self, requests: Sequence[Request]) -> list[BagelOutput]:
        """Run ``requests`` to the end together; returns their outputs in order. An error of any
        request is raised (after the scheduler, only that request's)."""
        requests = list(requests)
        sched = self._scheduler
        if sched is not None and sched.running and threading.current_thread() is not sched.thread:
            return sched.run(requests)
        with use_backend(self.attention):
            return self._run_here(requests)

    def _run_here(self, requests: list[Request]) -> list[BagelOutput]:
        builder = self.builder(requests[0].trace if len(requests) == 1 else None)
        actives = [self.admit(r, builder) for r in requests]
        while True:
            pending = [a for a in actives if not a.finished]
            if not pending:
                break
            self.tick(pending)
            for a in pending:
                if a.error is not None:
                    raise a.error
        return [a.output() for a in actives]

    # ------------------------------------------------------------------------------ stages
    def builder(self, trace: dict | None = None) -> ContextBuilder:
        return ContextBuilder(self.model, self.tokenizer, self.vae_encode, self.device, trace=trace,
                              max_len=self.max_model_len)

    def admit(self, request: Request, builder: ContextBuilder) -> _Active:
        """Stages 1 (validate) and 2 (prefill, all of it); then the request waits for its first tick."""
        a = self.begin(request, builder)
        while not self.prefill_block(a):
            pass
        return a

    def begin(self, request: Request, builder: ContextBuilder) -> _Active:
        """Stage 1 (validate); the prefill is then run by :meth:`prefill_block`, an image block at a time."""
        if self.lockstep is not None and request.seed is None:  # every rank draws the same noise
            on = self.device if dist.get_backend(self.lockstep) == "nccl" else "cpu"  # NCCL moves GPU tensors only
            seed = torch.tensor([_new_seed() if dist.get_rank(self.lockstep) == 0 else 0], dtype=torch.int64,
                                device=on)
            dist.broadcast(seed, src=dist.get_global_rank(self.lockstep, 0), group=self.lockstep)
            request = replace(request, seed=int(seed))
        a = _Active(request, builder)
        a.text_params = request.text.validate()
        a.image_params = None if request.understanding_output else request.image.validate()
        if a.image_params is not None:
            self.limits.check_timesteps(a.image_params.num_timesteps)
        if not request.inputs:
            raise BagelInputError("inputs is empty: give at least one text or image")
        a.stage, a.prefill = "prefill", self._prefill(a)
        return a

    def prefill_block(self, a: _Active) -> bool:
        """Stage 2 up to the next input image the prefill computes (its VAE or ViT block: the big ones; text
        blocks run on), so a scheduler can run the running requests' steps in between (chunked prefill).
        True when the prefill is done and the request is ready for its first tick."""
        try:
            next(a.prefill)
            return False
        except StopIteration:
            pass
        r = a.request
        if r.understanding_output or r.think:
            self._check_decode_room(a)
        if not r.understanding_output:
            self.check_size(a.height, a.width)
        a.stage = "prefilled"
        if r.understanding_output or r.think:
            self._start_text(a)
        else:
            self._start_image(a)
        return True

    def _prefill(self, a: _Active):
        """The three contexts of one request, built the way ``interleave_inference`` does; a generator that
        pauses after each image block it computed (``prefill_block``)."""
        r, builder = a.request, a.builder
        if r.text.do_sample:
            a.sample_gen = torch.Generator(self.device if self.device.type != "meta" else "cpu").manual_seed(a.seed)
        prepared = [item if isinstance(item, (str, PreparedImage)) else self.prepare_image(item, key=(id(a), i))
                    for i, item in enumerate(r.inputs)]
        gen = cfg_text = cfg_img = Context()
        if r.think:
            system = VLM_THINK_SYSTEM_PROMPT if r.understanding_output else GEN_THINK_SYSTEM_PROMPT
            gen = builder.add_text(gen, system)
            cfg_img = builder.add_text(cfg_img, system)
        height, width = r.image_shape
        pictures = [item for item in prepared if not isinstance(item, str)]
        if pictures and not r.understanding_output:
            try:
                height, width = pictures[r.size_from].size_hw
            except IndexError:
                raise BagelInputError(f"size_from {r.size_from}: there are {len(pictures)} input images") from None
        for item in prepared:
            if isinstance(item, str):
                cfg_text = gen
                gen = builder.add_text(gen, item)
                cfg_img = builder.add_text(cfg_img, item)
            else:
                if not r.understanding_output:
                    eps = None
                    if r.sample_posterior:
                        eps = torch.randn((1, *self.latent_shape(*item.size_hw)), generator=a.cpu_gen)
                    forwards = builder.forwards
                    gen = builder.add_vae_image(gen, item, eps)
                    if builder.forwards != forwards:
                        yield
                forwards = builder.forwards
                gen = builder.add_vit_image(gen, item)
                if builder.forwards != forwards:
                    yield
                cfg_text = gen
        if (r.think and r.think_contexts == "eval" and not r.understanding_output
                and all(isinstance(item, str) for item in prepared)):
            # gen_images_mp_wise.py: the unconditional branch attends to its own tokens only (no cache; its
            # positions start after the system prompt, which RoPE's relative positions make the same as 0)
            cfg_text = Context()
        if r.negative_prompt and not r.understanding_output:
            cfg_text = builder.add_text(cfg_text, r.negative_prompt)
        a.gen, a.cfg_text, a.cfg_img = gen, cfg_text, cfg_img
        a.height, a.width = int(height), int(width)
        a.out.timings["prefill_s"] = time.perf_counter() - a.t_start
        a.out.params = {"seed": a.seed, "understanding_output": r.understanding_output, "think": r.think,
                        **asdict(a.text_params)}
        if r.negative_prompt and not r.understanding_output:
            a.out.params["negative_prompt"] = r.negative_prompt
        if r.trace is not None:
            r.trace["contexts"] = {"gen": gen, "cfg_text": cfg_text, "cfg_img": cfg_img}

    def _check_decode_room(self, a: _Active) -> None:
        room = self.max_model_len - a.gen.length
        if a.text_params.max_think_token_n > room:
            raise BagelInputError(
                f"max_new_tokens {a.text_params.max_think_token_n} does not fit: the context already holds "
                f"{a.gen.length} tokens and the limit is {self.max_model_len} (max_model_len); "
                f"ask for at most {max(room, 0)}")

    def _start_text(self, a: _Active) -> None:
        """Stage 3: decode the answer (or the think text) from the full context, a token per tick."""
        r, params = a.request, a.text_params
        cap = params.max_think_token_n - 1  # tokens an answer may hold (the start token counts)
        a.calls, a.ids, a.shown, a.stopped = 0, [self.tokenizer.special.bos], "", False
        callback = r.callback if r.understanding_output else None  # think tokens do not count as steps
        on_text = r.on_text

        stops = params.stop if r.understanding_output else ()  # stop strings end answers, not think text

        def on_token(token: int) -> None:
            a.calls += 1  # the token after the last kept one is seen too: calls > cap means it was cut
            if callback is not None:
                callback(a.calls, cap)
            if (on_text is None and not stops) or a.calls > cap:
                return
            a.ids.append(token)
            text = self.tokenizer.decode_generation(a.ids)
            if text.endswith("\ufffd"):
                return  # a multi-byte character waits for its last byte
            if stops:
                cut = first_stop(text, stops)
                if cut is not None:
                    a.decoding.done = a.stopped = True  # a stop string: the answer ends before it
                    text = text[:cut]
                else:
                    text = text[:len(text) - held_back(text, stops)]  # may begin a stop string: wait
            if on_text is not None and text.startswith(a.shown) and len(text) > len(a.shown):
                on_text(text[len(a.shown):])
                a.shown = text

        a.decoding = TextDecode(self.model, self.tokenizer.special, a.gen, params, self.device, a.sample_gen,
                                r.trace, on_token=a.guard(on_token))
        a.stage, a.t_stage = "text", time.perf_counter()
        if a.decoding.done:
            self._text_done(a)

    def _text_done(self, a: _Active) -> None:
        """Stage 6 for text (or the end of think): the tokens become text."""
        r = a.request
        tokens = a.ids if a.stopped else a.decoding.tokens  # (the token that ended on a stop string was not fed)
        text = self.tokenizer.decode_generation(tokens)
        cut = first_stop(text, a.text_params.stop) if r.understanding_output else None
        if cut is not None:
            text = text[:cut]
        if r.on_text is not None and text.startswith(a.shown) and len(text) > len(a.shown):
            a.guard(r.on_text)(text[len(a.shown):])
        a.out.text = text
        a.out.prompt_tokens, a.out.completion_tokens = a.gen.length, len(tokens) - 1
        a.out.finish_reason = "length" if cut is None and a.calls > a.text_params.max_think_token_n - 1 else "stop"
        a.decoding = None
        took = time.perf_counter() - a.t_stage
        if r.understanding_output:
            a.out.timings.update(decode_s=took, tokens=len(tokens) - 1)
            a.stage = "done"
            return
        # re-tokenized, as the official code does
        conditioning = simple_think(text) if r.simple_think else text
        a.gen = a.builder.add_text(a.gen, conditioning)
        if r.think_contexts == "eval":
            a.cfg_img = a.builder.add_text(a.cfg_img, conditioning)
        a.out.timings["think_s"] = took
        self._start_image(a)

    def _start_image(self, a: _Active) -> None:
        """Stage 4: the starting latent; then stage 5 runs a step per tick."""
        r = a.request
        ps, z = self.config.bagel.latent_patch_size, self.config.vae.z_channels
        z_shape = self.latent_shape(a.height, a.width)
        h, w = a.height // self.config.latent_downsample, a.width // self.config.latent_downsample
        if r.noise is not None:
            if tuple(r.noise.shape) != z_shape:
                raise BagelInputError(f"noise must have shape {z_shape} for a {a.width}x{a.height} image, "
                                      f"got {tuple(r.noise.shape)}")
            start = transforms.patchify_latent(r.noise.float().cpu(), ps)
        else:
            start = torch.randn((h * w, ps * ps * z), generator=a.cpu_gen)
        if r.trace is not None:
            r.trace["contexts"] = {"gen": a.gen, "cfg_text": a.cfg_text, "cfg_img": a.cfg_img}
        a.unpatchify = lambda tokens: transforms.unpatchify_latent(tokens.float(), h, w, ps, z)
        preview = None
        if r.on_step is not None:
            on_step = r.on_step

            def preview(step: int, total: int, x0: torch.Tensor) -> None:
                on_step(StepPreview(step, total, r.index, x0[0], a.unpatchify, lambda lat: self.decode_latent(lat)[1]))

        a.denoising = ImageDenoise(
            self.model, self.tokenizer.special, GuidanceContexts(a.gen, a.cfg_text, a.cfg_img), (h, w),
            start.to(self.latent_device), a.image_params, self.device, callback=a.guard(r.callback),
            trace=r.trace, preview=a.guard(preview))
        a.stage, a.t_stage = "image", time.perf_counter()

    def _image_done(self, a: _Active) -> None:
        """Stage 6 for images: the latent through the VAE decoder."""
        denoise_s = time.perf_counter() - a.t_stage
        latents = a.unpatchify(a.denoising.result())
        a.denoising = None
        t0 = time.perf_counter()
        decoded, a.out.image = self.decode_latent(latents, spread=True)
        if a.request.trace is not None:
            a.request.trace["decode_output"] = decoded.detach()
        a.out.latents = latents.cpu()
        a.out.timings.update(denoise_s=denoise_s, vae_decode_s=time.perf_counter() - t0)
        a.out.params.update(asdict(a.image_params), height=a.height, width=a.width)
        a.stage = "done"

    @torch.inference_mode()
    def tick(self, actives: Sequence[_Active]) -> None:
        """One batched step: the next token of every decoding request, the next denoising step of every
        image request. A request whose callback raised is left with its ``error``; the others go on."""
        texts = [a for a in actives if a.stage == "text" and a.error is None]
        images = [a for a in actives if a.stage == "image" and a.error is None]
        for group in (texts, images):  # the most requests each one was stepped with (itself included)
            for a in group:
                a.out.timings["batch"] = max(a.out.timings.get("batch", 1), len(group))
        if texts:
            decode_step(self.model, [a.decoding for a in texts], self.decoder_fn)
            for a in texts:
                if a.decoding.done and a.error is None:
                    self._settle(a, self._text_done)
        if images:
            if self.cfg_parallel is not None:  # one image at a time, its branches over the ranks
                for a in images:
                    denoise_step_cfg_parallel(self.model, a.denoising, self.cfg_parallel, self.decoder_fn)
            else:
                denoise_step(self.model, [a.denoising for a in images], self.decoder_fn)
            for a in images:
                if a.denoising.done and a.error is None:
                    self._settle(a, self._image_done)
        self.ticks += 1

    @staticmethod
    def _settle(a: _Active, stage: Callable[[_Active], None]) -> None:
        try:
            stage(a)
        except BaseException as e:  # noqa: BLE001 - this request's error, for its caller
            a.error = e

    # ------------------------------------------------------------------------------ helpers
    @property
    def vae_device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def latent_device(self) -> torch.device:
        """Where the denoised latent lives: the CPU in official-numerics mode, else the model device."""
        return torch.device("cpu") if self.official_numerics else self.device

    @property
    def max_model_len(self) -> int:
        """Tokens one request may hold: ``limits.max_model_len``, at most the model's context length."""
        own = self.config.llm.max_position_embeddings
        return min(own, self.limits.max_model_len) if self.limits.max_model_len else own

    def check_size(self, height: int, width: int) -> None:
        d, top = self.config.latent_downsample, self.config.max_image_side
        for name, side in (("height", height), ("width", width)):
            if not isinstance(side, int) or isinstance(side, bool):
                raise BagelInputError(f"{name} must be an integer (got {side!r})")
            if side < d or side > top or side % d:
                raise BagelInputError(
                    f"{name} {side} is not supported: use a multiple of {d} between {d} and {top} "
                    f"(the model's latent position table covers {top} px per side)"
                )

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        d = self.config.vae.downsample
        return self.config.vae.z_channels, height // d, width // d

    def prepare_image(self, image: ImageInput, key: object, max_side: int | None = None,
                      vit_from_original: bool = False, resize=None) -> PreparedImage:
        """An input image through the official VAE and ViT resize rules. ``max_side`` caps the VAE
        size's long side (and the short-side minimum with it), e.g. to fine-tune at 512 px.
        The official inference resizes for the ViT from the VAE-resized image; the official trainer from
        the original (``vit_from_original=True``; tests/test_train_parity.py). ``resize``: other rules,
        ``.vae`` / ``.vit`` each ``(max, min, stride, max_pixels)`` or None for the model's (a training
        group's ``image_transform_args``)."""
        img = transforms.to_rgb(transforms.check_image(image))
        vae_max, vae_min, vae_stride = self.config.bagel.vae_transform
        vit_max, vit_min, vit_stride = self.config.bagel.vit_transform
        vae_pixels = vit_pixels = transforms.DEFAULT_MAX_PIXELS
        if resize is not None and resize.vae is not None:
            vae_max, vae_min, vae_stride, vae_pixels = resize.vae
        if resize is not None and resize.vit is not None:
            vit_max, vit_min, vit_stride, vit_pixels = resize.vit
        if max_side is not None:
            vae_max, vae_min = min(vae_max, max_side), min(vae_min, max_side)
        resized = transforms.resize_image(img, vae_max, vae_min, vae_stride, vae_pixels or transforms.DEFAULT_MAX_PIXELS)
        vit_img = transforms.resize_image(img if vit_from_original else resized, vit_max, vit_min, vit_stride,
                                          vit_pixels or transforms.DEFAULT_MAX_PIXELS)
        return PreparedImage(key=key, vae_image=resized, vae_pixels=transforms.image_to_tensor(resized),
                             vit_pixels=transforms.image_to_tensor(vit_img))

    def vae_encode(self, pixels: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        dev = self.vae_device
        pixels = pixels.to(dev, self.vae.dtype)
        if self.vae_tiling is not None:
            moments = encode_tiled(self.vae.encode_moments, pixels, self.vae_tiling, self.vae.downsample,
                                   2 * self.vae.cfg.z_channels, group=self.vae_group)
        else:
            moments = self.vae.encode_moments(pixels)
        return self.vae.latent_from_moments(moments, None if eps is None else eps.to(dev, moments.dtype))

    def decode_latent(self, latents: torch.Tensor, spread: bool = False) -> tuple[torch.Tensor, Image.Image]:
        """(z, H/d, W/d) latent -> (the VAE's output tensor, the picture). ``spread``: over the VAE patch-parallel
        ranks (the results, which every rank decodes; a preview is one rank's own and stays there)."""
        z = latents.unsqueeze(0).to(self.vae_device, self.vae.dtype)
        if self.vae_tiling is not None:
            decoded = decode_tiled(self.vae.decode, z, self.vae_tiling, self.vae.downsample, self.vae.cfg.out_ch,
                                   group=self.vae_group if spread else None)
        else:
            decoded = self.vae.decode(z)
        return decoded, transforms.tensor_to_image(decoded[0].float().cpu())


_STOP = object()


class _Group:
    """The requests of one ``run`` call: they fail together."""

    error: BaseException | None = None


class Scheduler:
    """The thread that owns the model once batching is on: requests of any caller join the running
    batch at the next step boundary (at most ``max_batch`` at once; the rest wait in arrival order)
    and leave it when done; each caller waits for its own requests only. With ``max_step_tokens``, a
    prefilled request whose rows would take a step's forward over the budget waits (holding its
    contexts) until there is room; one request alone always runs. Prefill is chunked: while requests run,
    a newcomer's prefill computes one input image's block between two steps (its text blocks run on), so an
    edit of large pictures arriving does not stall the running steps for its whole prefill."""

    def __init__(self, engine: Engine, max_batch: int = 8, max_step_tokens: int | None = None):
        self.engine, self.max_batch, self.max_step_tokens = engine, max_batch, max_step_tokens
        self._held: list[_Active] = []  # prefilled, waiting for room in the step budget
        self._prefilling: list[_Active] = []  # admitted, their prefill under way (a block per step)
        self._incoming: queue.Queue = queue.Queue()
        self._waiting: list[tuple[Request, ContextBuilder, concurrent.futures.Future, _Group]] = []
        self.thread = threading.Thread(target=self._loop, name="bagel-scheduler", daemon=True)
        self.running = False
        self.active_count = 0

    def start(self) -> "Scheduler":
        self.running = True
        self.thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        self.running = False
        self._incoming.put(_STOP)
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def run(self, requests: list[Request]) -> list[BagelOutput]:
        """Hand one caller's requests to the scheduler and wait for them. They are one call: when one
        fails (its callback raised: the caller went away), the others of the call stop too."""
        builder = self.engine.builder(requests[0].trace if len(requests) == 1 else None)
        group = _Group()
        futures = []
        for r in requests:
            f: concurrent.futures.Future = concurrent.futures.Future()
            self._incoming.put((r, builder, f, group))
            futures.append(f)
        return [f.result() for f in futures]

    def _loop(self) -> None:
        with torch.inference_mode(), use_backend(self.engine.attention):
            self._serve()

    def _serve(self) -> None:
        active: list[_Active] = []
        while True:
            block = not active and not self._waiting and not self._held and not self._prefilling
            try:
                while True:
                    item = self._incoming.get(block=block)
                    block = False
                    if item is _STOP:
                        return self._fail_all(active, RuntimeError("the engine's scheduler stopped"))
                    self._waiting.append(item)
            except queue.Empty:
                pass
            for a in [h for h in self._held if h.group.error is not None]:  # its call failed meanwhile
                self._held.remove(a)
                a.future.set_exception(a.group.error)
            while self._held and self._fits(active, self._held[0]):
                active.append(self._held.pop(0))
            while self._waiting and len(active) + len(self._held) + len(self._prefilling) < self.max_batch:
                request, builder, future, group = self._waiting.pop(0)
                if not future.set_running_or_notify_cancel():
                    continue
                if group.error is not None:
                    future.set_exception(group.error)
                    continue
                try:
                    a = self.engine.begin(request, builder)
                except BaseException as e:  # noqa: BLE001 - a bad request fails alone (with its call)
                    group.error = e
                    future.set_exception(e)
                    continue
                a.future, a.group = future, group
                self._prefilling.append(a)
            self._advance_prefills(active)
            if not active and self._held:  # one request alone always runs
                active.append(self._held.pop(0))
            self.active_count = len(active)
            if not active:
                continue
            try:
                self.engine.tick([a for a in active if not a.finished])
            except BaseException as e:  # noqa: BLE001 - a failure of the batch fails its requests, not the thread
                log.exception("a batched step failed")
                for a in active:
                    if a.error is None and not a.finished:
                        a.error = e
            for a in active:
                if a.error is not None and a.group.error is None:
                    a.group.error = a.error
            still = []
            for a in active:
                if a.error is None and a.group.error is not None and a.stage != "done":
                    a.error = a.group.error  # another request of the same call failed
                if a.error is not None:
                    a.future.set_exception(a.error)
                elif a.stage == "done":
                    a.future.set_result(a.output())
                else:
                    still.append(a)
            active = still
            self.active_count = len(active)

    def _advance_prefills(self, active: list[_Active]) -> None:
        """Run the prefills under way in arrival order: one image block in all while requests are running (then
        the step), all of them when none is. A finished prefill joins the batch (or waits for room)."""
        while self._prefilling:
            a = self._prefilling[0]
            if a.group.error is not None:  # its call failed meanwhile
                self._prefilling.pop(0)
                a.future.set_exception(a.group.error)
                continue
            try:
                done = self.engine.prefill_block(a)
            except BaseException as e:  # noqa: BLE001 - a bad request fails alone (with its call)
                self._prefilling.pop(0)
                a.group.error = e
                a.future.set_exception(e)
                continue
            if done:
                self._prefilling.pop(0)
                if not self._held and self._fits(active, a):
                    active.append(a)
                else:
                    self._held.append(a)
            elif any(not x.finished for x in active):
                return  # an image block ran: the running requests step before the next one

    def _fits(self, active: list[_Active], a: _Active) -> bool:
        if self.max_step_tokens is None or not active:
            return True
        return sum(x.rows for x in active if not x.finished) + a.rows <= self.max_step_tokens

    def _fail_all(self, active: list[_Active], error: BaseException) -> None:
        for a in [*active, *self._held, *self._prefilling]:
            if not a.future.done():
                a.future.set_exception(error)
        for _, _, f, _ in self._waiting:
            if not f.done():
                f.set_exception(error)
        self._waiting.clear()
        self._held.clear()
        self._prefilling.clear()
        self.active_count = 0
