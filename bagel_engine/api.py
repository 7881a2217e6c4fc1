"""The public API: ``load()`` and ``BagelPipeline``. Every front end (CLI, batch jobs, server, UI)
calls this module and nothing below it.

``BagelPipeline.interleave`` follows the official ``InterleaveInferencer.interleave_inference``
(same argument names, meanings and defaults); ``generate`` / ``edit`` / ``understand`` / ``chat``
are task methods with the official app's defaults.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from bagel_engine import params as P
from bagel_engine.model.autoencoder import AutoEncoder
from bagel_engine.model.attention import set_backend as set_attention_backend
from bagel_engine.model.bagel import Bagel
from bagel_engine.params import BagelInputError, ImageParams, TextParams
from bagel_engine.runtime import image_transforms as T
from bagel_engine.runtime.context import Context, ContextBuilder, PreparedImage
from bagel_engine.runtime.image_generation import GuidanceContexts, denoise
from bagel_engine.runtime.text_decoding import decode_tokens
from bagel_engine.runtime.tokenizer import BagelTokenizer
from bagel_engine.weights.config import ModelConfig, load_model_config, read_task_defaults
from bagel_engine.weights.loader import (AE_FILE, MODEL_FILE, build_modules, init_random, load_weights,
                                         parse_dtype, resolve_model_dir)

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


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


QUANTIZE_METHODS = ("fp8", "int8", "nf4")
OFFLOAD_MODES = ("model", "layer")


def load(
    model: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    official_numerics: bool = False,
    quantize: str | None = None,
    offload: str | None = None,
    random_weights: bool = False,
    seed: int = 0,
    compile: bool = False,
    attention: str = "auto",
    progress: bool = False,
    lora: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    lora_strength: float = 1.0,
) -> "BagelPipeline":
    """Load BAGEL from a directory in the official layout or a hub id (``ByteDance-Seed/BAGEL-7B-MoT``).

    ``device``: default cuda when available, else cpu; ``"meta"`` builds the modules without reading
    any weight. ``dtype``: default bfloat16 on a GPU, float32 on the CPU. The VAE runs on the model's
    device, in bf16 on a GPU; ``official_numerics=True`` keeps the VAE and the Euler update on the
    CPU in float32, as the official app does (on a CPU in float32 the two paths are the same).
    ``quantize`` ("fp8", "int8", "nf4") quantizes the decoder's linear layers at load time;
    ``offload`` ("model", "layer") keeps the weights in CPU memory and streams them to the GPU.
    ``random_weights=True`` builds the model from the configs alone with random weights (seeded by
    ``seed``): for benchmarks of the real architecture without the real checkpoint.
    ``compile=True`` compiles the denoising step and the decoding step with torch.compile (static
    shapes; CUDA graphs on a GPU). ``attention``: "auto", "sdpa", "flex" or "flash".
    ``lora``: LoRA adapter file(s) (``lora_adapter.safetensors``, or a ``bagel train`` checkpoint
    directory holding one) merged into the weights at load, each scaled by ``lora_strength``.
    """
    if quantize is not None and quantize not in QUANTIZE_METHODS:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {', '.join(QUANTIZE_METHODS)}")
    if offload is not None and offload not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload {offload!r}; choose one of {', '.join(OFFLOAD_MODES)}")
    model_dir = resolve_model_dir(model)
    cfg = load_model_config(model_dir)
    device = torch.device(device) if device is not None else _default_device()
    dtype = parse_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    t0 = time.perf_counter()
    bagel, vae = build_modules(cfg, "meta")
    weights_device = torch.device("cpu") if offload else device
    vae_device = torch.device("cpu") if official_numerics and device.type != "meta" else device
    # The VAE runs in bf16 on a GPU (fast path) and in float32 on the CPU (official path).
    vae_dtype = torch.bfloat16 if vae_device.type == "cuda" else torch.float32
    if device.type != "meta":
        if random_weights:
            init_random(bagel, weights_device, dtype, seed)
            init_random(vae, vae_device, vae_dtype, seed + 1)
        else:
            bar = _byte_bar(model_dir, progress)
            load_weights(bagel, model_dir / MODEL_FILE, weights_device, dtype, cfg, progress=bar.update if bar else None)
            load_weights(vae, model_dir / AE_FILE, vae_device, vae_dtype, cfg, progress=bar.update if bar else None)
            if bar:
                bar.close()
        for adapter in ([] if lora is None else [lora] if isinstance(lora, (str, os.PathLike)) else list(lora)):
            from bagel_engine.weights.adapters import merge_adapter

            count = merge_adapter(bagel, adapter, lora_strength)
            log.info("merged the LoRA adapter %s (%d layers, strength %g)", adapter, count, lora_strength)
        if quantize:
            from bagel_engine.weights.quantize import quantize_model

            quantize_model(bagel, quantize)
        if offload:
            from bagel_engine.weights.offload import apply_offload

            apply_offload(bagel, offload, device)
    tokenizer = BagelTokenizer.from_dir(model_dir, fallback=random_weights or device.type == "meta")
    log.info("loaded %s on %s (%s) in %.1f s", model_dir, device, dtype, time.perf_counter() - t0)
    set_attention_backend(attention)
    defaults = P.TaskDefaults.from_dict(read_task_defaults(model_dir), str(model_dir / "task_defaults.json"))
    pipe = BagelPipeline(bagel, vae, tokenizer, cfg, device=device, dtype=dtype, model_name=str(model),
                         official_numerics=official_numerics, task_defaults=defaults)
    if compile:
        pipe.compile()
    return pipe


def _byte_bar(model_dir: Path, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    total = sum((model_dir / f).stat().st_size for f in (MODEL_FILE, AE_FILE) if (model_dir / f).exists())
    return tqdm(total=total, unit="B", unit_scale=True, desc="loading weights")


def _new_seed() -> int:
    return random.SystemRandom().randrange(2**31)


@dataclass
class _Job:
    """One request on its way through the pipeline."""

    seed: int
    t_start: float
    cpu_gen: torch.Generator
    sample_gen: torch.Generator | None = None
    gen: Context = field(default_factory=Context)
    cfg_text: Context = field(default_factory=Context)
    cfg_img: Context = field(default_factory=Context)
    height: int = 0
    width: int = 0
    text: str | None = None
    image: Image.Image | None = None
    latents: torch.Tensor | None = None
    params: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None

    def output(self) -> BagelOutput:
        self.timings["total_s"] = time.perf_counter() - self.t_start
        return BagelOutput(text=self.text, image=self.image, latents=self.latents, seed=self.seed,
                           params=self.params, timings=self.timings, prompt_tokens=self.prompt_tokens,
                           completion_tokens=self.completion_tokens, finish_reason=self.finish_reason)


class BagelPipeline:
    def __init__(self, model: Bagel, vae: AutoEncoder, tokenizer: BagelTokenizer, config: ModelConfig, *,
                 device: torch.device, dtype: torch.dtype, model_name: str = "bagel",
                 official_numerics: bool = False, task_defaults: P.TaskDefaults | None = None):
        self.model, self.vae, self.tokenizer, self.config = model, vae, tokenizer, config
        # The defaults of the task methods: the official app's, or the model directory's task_defaults.json.
        self.task_defaults = task_defaults or P.TaskDefaults()
        self.limits = P.Limits()  # what one request may ask for (a server sets its own)
        self.device, self.dtype, self.model_name = device, dtype, model_name
        self.official_numerics = official_numerics
        self._decoder_fn = None  # a compiled decoder step (see ``compile``)

    def compile(self, mode: str | None = None) -> "BagelPipeline":
        """Compile the decoder for the denoising and decoding steps (torch.compile, static shapes).
        Default mode: "reduce-overhead" (CUDA graphs) on a GPU, the default mode elsewhere."""
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
        self._decoder_fn = torch.compile(self.model.decoder, dynamic=False, mode=mode)
        return self

    # ----------------------------------------------------------------------------- helpers
    @property
    def vae_device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def latent_device(self) -> torch.device:
        """Where the denoised latent lives: the CPU in official-numerics mode, else the model device."""
        return torch.device("cpu") if self.official_numerics else self.device

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

    def prepare_image(self, image: ImageInput, key: object, max_side: int | None = None) -> PreparedImage:
        """An input image through the official VAE and ViT resize rules. ``max_side`` caps the VAE
        size's long side (and the short-side minimum with it), e.g. to fine-tune at 512 px."""
        img = T.to_rgb(T.check_image(image))
        vae_max, vae_min, vae_stride = self.config.bagel.vae_transform
        vit_max, vit_min, vit_stride = self.config.bagel.vit_transform
        if max_side is not None:
            vae_max, vae_min = min(vae_max, max_side), min(vae_min, max_side)
        resized = T.resize_image(img, vae_max, vae_min, vae_stride)
        vit_img = T.resize_image(resized, vit_max, vit_min, vit_stride)
        return PreparedImage(key=key, vae_image=resized, vae_pixels=T.image_to_tensor(resized),
                             vit_pixels=T.image_to_tensor(vit_img))

    def _vae_encode(self, pixels: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        dev = self.vae_device
        moments = self.vae.encode_moments(pixels.to(dev, self.vae.dtype))
        return self.vae.latent_from_moments(moments, None if eps is None else eps.to(dev, moments.dtype))

    def _latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        d = self.config.vae.downsample
        return self.config.vae.z_channels, height // d, width // d

    # ----------------------------------------------------------------------------- official API
    @torch.inference_mode()
    def interleave(
        self,
        inputs: Sequence[str | ImageInput],
        *,
        understanding_output: bool = False,
        think: bool = False,
        max_think_token_n: int = 1000,
        do_sample: bool = False,
        text_temperature: float = 0.3,
        cfg_text_scale: float = 3.0,
        cfg_img_scale: float = 1.5,
        cfg_interval: Sequence[float] = (0.4, 1.0),
        timestep_shift: float = 3.0,
        num_timesteps: int = 50,
        cfg_renorm_min: float = 0.0,
        cfg_renorm_type: str = "global",
        image_shapes: Sequence[int] = (1024, 1024),
        seed: int | None = None,
        noise: torch.Tensor | None = None,
        enable_taylorseer: bool = False,
        sample_posterior: bool = True,
        callback: Callable[[int, int], None] | None = None,
        on_text: Callable[[str], None] | None = None,
        on_step: Callable[[StepPreview], None] | None = None,
        trace: dict | None = None,
    ) -> BagelOutput:
        """The official ``interleave_inference``: ``inputs`` is an ordered list of texts and images.

        Returns the answer (``understanding_output=True``) or an image (with the think text in
        ``text`` when ``think``). ``seed`` reproduces the official random draws; ``noise`` injects
        the starting latent (shape as ``BagelOutput.latents``). ``sample_posterior=False`` uses the
        VAE posterior mean for input images instead of a sample (deterministic, not official).
        ``enable_taylorseer`` turns on the official TaylorSeer step cache (fewer decoder forwards).
        ``callback(k, total)`` after each denoising step or text token (raise in it to stop);
        ``on_text(delta)`` with each new piece of the answer or think text as it is written;
        ``on_step(preview)`` after each denoising step with a :class:`StepPreview` (live previews).
        ``trace`` (a dict) collects intermediate tensors for debugging.
        """
        if not inputs:
            raise BagelInputError("inputs is empty: give at least one text or image")
        return self._run(
            [list(inputs)], [seed], [noise], understanding_output=understanding_output, think=think,
            text_params=TextParams(max_think_token_n, do_sample, text_temperature),
            image_params=ImageParams(cfg_text_scale, cfg_img_scale, tuple(cfg_interval), cfg_renorm_type,
                                     cfg_renorm_min, timestep_shift, num_timesteps, enable_taylorseer),
            image_shapes=tuple(image_shapes), sample_posterior=sample_posterior, callback=callback,
            on_text=on_text, on_step=on_step, trace=trace,
        )[0]

    def _run(self, requests: list[list], seeds: list[int | None], noises: list[torch.Tensor | None], *,
             understanding_output: bool, think: bool, text_params: TextParams, image_params: ImageParams,
             image_shapes: tuple[int, int], sample_posterior: bool = True, callback=None, on_text=None,
             on_step=None, trace: dict | None = None) -> list[BagelOutput]:
        """Run several requests with the same parameters; their images (all of one size) are denoised
        together in batched forwards."""
        text_params = text_params.validate()
        image_params = None if understanding_output else image_params.validate()
        if image_params is not None:
            self.limits.check_timesteps(image_params.num_timesteps)
        builder = ContextBuilder(self.model, self.tokenizer, self._vae_encode, self.device, trace=trace,
                                 max_len=self.max_model_len)
        jobs = [self._prepare(inputs, seed, builder, understanding_output, think, text_params, image_shapes,
                              sample_posterior, trace)
                for inputs, seed in zip(requests, seeds)]
        if understanding_output or think:
            for job in jobs:
                self._check_decode_room(job, text_params)
        if understanding_output:
            for job in jobs:
                t0 = time.perf_counter()
                count = self._decode_text(job, text_params, trace, callback, on_text)
                job.timings.update(decode_s=time.perf_counter() - t0, tokens=count)
            return [job.output() for job in jobs]
        sizes = {(job.height, job.width) for job in jobs}
        if len(sizes) > 1:
            raise BagelInputError(f"images generated together must have one size, got {sorted(sizes)}")
        height, width = sizes.pop()
        self.check_size(height, width)
        if think:
            for job in jobs:
                t0 = time.perf_counter()
                self._decode_text(job, text_params, trace, on_text=on_text)
                job.gen = builder.add_text(job.gen, job.text)  # re-tokenized, as the official code does
                job.timings["think_s"] = time.perf_counter() - t0
        ps, z = self.config.bagel.latent_patch_size, self.config.vae.z_channels
        z_shape = self._latent_shape(height, width)
        h, w = height // self.config.latent_downsample, width // self.config.latent_downsample
        starts = []
        for job, noise in zip(jobs, noises):
            if noise is not None:
                if tuple(noise.shape) != z_shape:
                    raise BagelInputError(
                        f"noise must have shape {z_shape} for a {width}x{height} image, got {tuple(noise.shape)}")
                starts.append(T.patchify_latent(noise.float().cpu(), ps))
            else:
                starts.append(torch.randn((h * w, ps * ps * z), generator=job.cpu_gen))
        if trace is not None:
            job = jobs[0]
            trace["contexts"] = {"gen": job.gen, "cfg_text": job.cfg_text, "cfg_img": job.cfg_img}
        unpatchify = lambda tokens: T.unpatchify_latent(tokens.float(), h, w, ps, z)  # noqa: E731
        preview = None
        if on_step is not None:
            def preview(step: int, total: int, x0: torch.Tensor) -> None:
                for j in range(x0.shape[0]):
                    on_step(StepPreview(step, total, j, x0[j], unpatchify, lambda lat: self._decode_latent(lat)[1]))

        t0 = time.perf_counter()
        latent_tokens = denoise(
            self.model, self.tokenizer.special, [GuidanceContexts(j.gen, j.cfg_text, j.cfg_img) for j in jobs],
            (h, w), torch.stack(starts).to(self.latent_device), image_params, self.device, callback,
            trace, decoder_fn=self._decoder_fn, preview=preview,
        )
        denoise_s = time.perf_counter() - t0
        for job, tokens in zip(jobs, latent_tokens):
            latents = unpatchify(tokens)
            t0 = time.perf_counter()
            decoded, job.image = self._decode_latent(latents)
            if trace is not None:
                trace["decode_output"] = decoded.detach()
            job.latents = latents.cpu()
            job.timings.update(denoise_s=denoise_s, vae_decode_s=time.perf_counter() - t0)
            job.params.update(asdict(image_params), height=height, width=width)
        return [job.output() for job in jobs]

    def _decode_latent(self, latents: torch.Tensor) -> tuple[torch.Tensor, Image.Image]:
        """(z, H/d, W/d) latent -> (the VAE's output tensor, the picture)."""
        decoded = self.vae.decode(latents.unsqueeze(0).to(self.vae_device, self.vae.dtype))
        return decoded, T.tensor_to_image(decoded[0].float().cpu())

    @property
    def max_model_len(self) -> int:
        """Tokens one request may hold: ``limits.max_model_len``, at most the model's context length."""
        own = self.config.llm.max_position_embeddings
        return min(own, self.limits.max_model_len) if self.limits.max_model_len else own

    def _check_decode_room(self, job: "_Job", text_params: TextParams) -> None:
        room = self.max_model_len - job.gen.length
        if text_params.max_think_token_n > room:
            raise BagelInputError(
                f"max_new_tokens {text_params.max_think_token_n} does not fit: the context already holds "
                f"{job.gen.length} tokens and the limit is {self.max_model_len} (max_model_len); ask for at most {max(room, 0)}")

    def _decode_text(self, job: "_Job", text_params: TextParams, trace: dict | None, callback=None,
                     on_text=None) -> int:
        """Decode from the job's full context into ``job.text``; returns the number of new tokens.
        ``callback(k, max)`` after each token (it may raise to stop the job, as between denoising steps);
        ``on_text(delta)`` with each new piece of text as it is written (the pieces add up to ``job.text``)."""
        cap = text_params.max_think_token_n - 1  # tokens an answer may hold (the start token counts)
        calls, ids, shown = [0], [self.tokenizer.special.bos], [""]

        def on_token(token: int) -> None:
            calls[0] += 1  # the token after the last kept one is seen too: calls > cap means it was cut
            if callback is not None:
                callback(calls[0], cap)
            if on_text is not None and calls[0] <= cap:
                ids.append(token)
                text = self.tokenizer.decode_generation(ids)
                if not text.endswith("\ufffd") and text.startswith(shown[0]) and len(text) > len(shown[0]):
                    on_text(text[len(shown[0]):])  # (a multi-byte character waits for its last byte)
                    shown[0] = text

        tokens = decode_tokens(self.model, self.tokenizer.special, job.gen, text_params, self.device,
                               job.sample_gen, trace, on_token=on_token, decoder_fn=self._decoder_fn)
        job.text = self.tokenizer.decode_generation(tokens)
        if on_text is not None and job.text.startswith(shown[0]) and len(job.text) > len(shown[0]):
            on_text(job.text[len(shown[0]):])
        job.prompt_tokens, job.completion_tokens = job.gen.length, len(tokens) - 1
        job.finish_reason = "length" if calls[0] > cap else "stop"
        return len(tokens) - 1

    def _prepare(self, inputs: list, seed: int | None, builder: ContextBuilder, understanding_output: bool,
                 think: bool, text_params: TextParams, image_shapes: tuple[int, int], sample_posterior: bool,
                 trace: dict | None) -> "_Job":
        """Build the three contexts of one request the way ``interleave_inference`` does."""
        t_start = time.perf_counter()
        seed = _new_seed() if seed is None else int(seed)
        job = _Job(seed=seed, t_start=t_start, cpu_gen=torch.Generator("cpu").manual_seed(seed))
        if text_params.do_sample:
            job.sample_gen = torch.Generator(self.device if self.device.type != "meta" else "cpu").manual_seed(seed)
        prepared = [item if isinstance(item, str) else self.prepare_image(item, key=(id(job), i))
                    for i, item in enumerate(inputs)]
        gen = cfg_text = cfg_img = Context()
        if think:
            system = VLM_THINK_SYSTEM_PROMPT if understanding_output else GEN_THINK_SYSTEM_PROMPT
            gen = builder.add_text(gen, system)
            cfg_img = builder.add_text(cfg_img, system)
        height, width = image_shapes
        for item in prepared:
            if isinstance(item, str):
                cfg_text = gen
                gen = builder.add_text(gen, item)
                cfg_img = builder.add_text(cfg_img, item)
            else:
                if not understanding_output:
                    eps = None
                    if sample_posterior:
                        eps = torch.randn((1, *self._latent_shape(*item.size_hw)), generator=job.cpu_gen)
                    gen = builder.add_vae_image(gen, item, eps)
                gen = builder.add_vit_image(gen, item)
                height, width = item.size_hw
                cfg_text = gen
        job.gen, job.cfg_text, job.cfg_img = gen, cfg_text, cfg_img
        job.height, job.width = int(height), int(width)
        job.timings["prefill_s"] = time.perf_counter() - t_start
        job.params = {"seed": seed, "understanding_output": understanding_output, "think": think,
                      **asdict(text_params)}
        if trace is not None:
            trace["contexts"] = {"gen": gen, "cfg_text": cfg_text, "cfg_img": cfg_img}
        return job

    # ----------------------------------------------------------------------------- task methods
    @staticmethod
    def _need_prompt(prompt: Any, what: str) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise BagelInputError(f"{what} must be a non-empty string")
        return prompt

    @staticmethod
    def _as_list(images) -> list:
        if images is None:
            return []
        if isinstance(images, (list, tuple)):
            return list(images)
        return [images]

    def _image_knobs(self, defaults: ImageParams, knobs: dict) -> dict:
        P.split_knobs(knobs, P.IMAGE_PARAM_NAMES + P.TEXT_PARAM_NAMES)
        merged = {**asdict(defaults), **{k: v for k, v in knobs.items() if k in P.IMAGE_PARAM_NAMES}}
        merged.update(max_think_token_n=P.THINK_TOKENS_DEFAULT, do_sample=False, text_temperature=0.3)
        merged.update({k: v for k, v in knobs.items() if k in P.TEXT_PARAM_NAMES})
        return merged

    def generate(self, prompt: str | Sequence[str], *, height: int | None = None, width: int | None = None,
                 think: bool = False,
                 seed: int | Sequence[int] | None = None, noise: torch.Tensor | Sequence[torch.Tensor] | None = None,
                 callback=None, on_step=None, **knobs) -> BagelOutput | list[BagelOutput]:
        """Text to image, with the official app's defaults (cfg 4.0 / 1.5, interval 0.4-1, global renorm).

        ``prompt`` may be a list: the images are generated together, every denoising step of all of
        them in one batched forward, and a list of outputs is returned. Their seeds are ``seed + k``
        (or a list of seeds), so each image equals the one generated alone with its seed.
        ``height`` / ``width`` and knobs left out take ``self.task_defaults`` (the model directory's
        ``task_defaults.json``, else 1024x1024 and the app's values). ``on_step(preview)`` after each
        denoising step (a :class:`StepPreview` per image: the predicted clean latent and its picture).
        """
        height = self.task_defaults.height if height is None else height
        width = self.task_defaults.width if width is None else width
        if isinstance(prompt, str):
            self._need_prompt(prompt, "prompt")
            self.check_size(height, width)
            return self.interleave([prompt], think=think, image_shapes=(height, width), seed=seed, noise=noise,
                                   callback=callback, on_step=on_step,
                                   **self._image_knobs(self.task_defaults.t2i, knobs))
        prompts = list(prompt)
        if not prompts:
            raise BagelInputError("prompt list is empty")
        for p in prompts:
            self._need_prompt(p, "every prompt")
        self.check_size(height, width)
        if seed is None:
            seeds = [None] * len(prompts)
        elif isinstance(seed, int):
            seeds = [seed + k for k in range(len(prompts))]
        else:
            seeds = list(seed)
            if len(seeds) != len(prompts):
                raise BagelInputError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        noises = [None] * len(prompts) if noise is None else list(noise)
        if len(noises) != len(prompts):
            raise BagelInputError(f"{len(noises)} noise tensors for {len(prompts)} prompts")
        merged = self._image_knobs(self.task_defaults.t2i, knobs)
        text_params = TextParams(*(merged.pop(k) for k in P.TEXT_PARAM_NAMES))
        merged["cfg_interval"] = tuple(merged["cfg_interval"])
        return self._run([[p] for p in prompts], seeds, noises, understanding_output=False, think=think,
                         text_params=text_params, image_params=ImageParams(**merged),
                         image_shapes=(height, width), callback=callback, on_step=on_step)

    def edit(self, images, prompt: str, *, think: bool = False, seed: int | None = None,
             noise: torch.Tensor | None = None, callback=None, on_step=None, **knobs) -> BagelOutput:
        """Edit one or several images (the output has the last image's resized size); app defaults
        (cfg 4.0 / 2.0, interval 0-1, text_channel renorm)."""
        images = self._as_list(images)
        if not images:
            raise BagelInputError("edit needs at least one input image")
        self._need_prompt(prompt, "prompt")
        return self.interleave([*images, prompt], think=think, seed=seed, noise=noise, callback=callback,
                               on_step=on_step, **self._image_knobs(self.task_defaults.edit, knobs))

    def understand(self, images, question: str, *, think: bool = False, max_new_tokens: int | None = None,
                   do_sample: bool = False, text_temperature: float = 0.3, seed: int | None = None,
                   callback=None, on_text=None) -> BagelOutput:
        """Answer a question about one or several images (``max_new_tokens``: default the model's, else 512).
        ``callback(k, max)`` after each answer token (raise in it to stop); ``on_text(delta)`` with each new
        piece of the answer as it is written (streaming; the pieces add up to ``text``)."""
        if max_new_tokens is None:
            max_new_tokens = self.task_defaults.understand_tokens
        images = self._as_list(images)
        if not images:
            raise BagelInputError("understand needs at least one input image")
        self._need_prompt(question, "question")
        return self.interleave([*images, question], understanding_output=True, think=think,
                               max_think_token_n=max_new_tokens, do_sample=do_sample,
                               text_temperature=text_temperature, seed=seed, callback=callback, on_text=on_text)

    def chat(self, prompt: str, *, think: bool = False, max_new_tokens: int | None = None,
             do_sample: bool = False, text_temperature: float = 0.3, seed: int | None = None,
             callback=None, on_text=None) -> BagelOutput:
        """Text in, text out (``max_new_tokens``: default the model's, else 512); ``callback`` and
        ``on_text`` as in ``understand``."""
        if max_new_tokens is None:
            max_new_tokens = self.task_defaults.chat_tokens
        self._need_prompt(prompt, "prompt")
        return self.interleave([prompt], understanding_output=True, think=think, max_think_token_n=max_new_tokens,
                               do_sample=do_sample, text_temperature=text_temperature, seed=seed, callback=callback,
                               on_text=on_text)
