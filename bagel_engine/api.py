"""The public API: ``load()`` and ``BagelPipeline``. Every front end (CLI, batch jobs, server, UI)
calls this module and nothing below it.

``BagelPipeline.interleave`` follows the official ``InterleaveInferencer.interleave_inference``
(same argument names, meanings and defaults); ``generate`` / ``edit`` / ``understand`` / ``chat``
are task methods with the official app's defaults.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Sequence

import torch

from bagel_engine import params
from bagel_engine.distributed import Parallelism, parallel_groups
from bagel_engine.model.autoencoder import AutoEncoder
from bagel_engine.model.attention import check_backend
from bagel_engine.model.bagel import Bagel
from bagel_engine.params import BagelInputError, ImageParams, TextParams
from bagel_engine.runtime.context import PreparedImage
from bagel_engine.runtime.engine import (GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT, BagelOutput, Engine,
                                         ImageInput, Request, StepPreview)
from bagel_engine.runtime.tokenizer import BagelTokenizer
from bagel_engine.runtime import task_requests
from bagel_engine.runtime.vae_tiling import Tiling
from bagel_engine.weights.config import ModelConfig, checkpoint_config, checkpoint_task_defaults
from bagel_engine.weights.hub import HubOptions
from bagel_engine.weights.layout import find_checkpoint
from bagel_engine.weights.loader import parse_dtype, resolve_model_dir
from bagel_engine.weights.placement import (OFFLOAD_MODES, QUANTIZE_METHODS, Placement, load_modules,
                                            weight_bytes_bar)

log = logging.getLogger("bagel_engine")

__all__ = ["load", "BagelPipeline", "BagelOutput", "StepPreview", "Request", "ImageInput", "QUANTIZE_METHODS",
           "OFFLOAD_MODES", "GEN_THINK_SYSTEM_PROMPT", "VLM_THINK_SYSTEM_PROMPT"]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    vae_tiling: bool = False,
    cfg_parallel_size: int | None = None,
    tensor_parallel_size: int | None = None,
    vae_patch_parallel_size: int | None = None,
    shard_weights: bool = False,
    devices: str | Sequence[str] | None = None,
    layer_split: Sequence[int] | None = None,
    max_memory: str | int | Sequence | None = None,
    progress: bool = False,
    lora: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    lora_strength: float = 1.0,
    weights_file: str | os.PathLike | None = None,
    base_config: str | os.PathLike | None = None,
    task_defaults: str | os.PathLike | dict | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
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
    ``vae_tiling=True``: images above 256 px a side (BAGEL-7B-MoT) go through the VAE in overlapping tiles
    (:meth:`BagelPipeline.enable_vae_tiling`): less memory at high resolution, not the same numbers.
    ``cfg_parallel_size`` (2 or 3, under torchrun with as many processes): each denoising step's guidance
    branches run on their own rank (:meth:`BagelPipeline.enable_cfg_parallel`); on a GPU each rank takes
    ``cuda:LOCAL_RANK`` unless ``device`` says otherwise. ``tensor_parallel_size`` (under torchrun): every layer's
    heads and MLP columns split over that many ranks (``bagel_engine.weights.tensor_parallel``); with
    ``cfg_parallel_size`` too, a mesh of ``cfg x tp`` processes (``bagel_engine.distributed``).
    ``vae_patch_parallel_size`` (every rank of that mesh, or alone a world of that many): VAE tiling on, the tiles of
    input images and results spread over the ranks. ``shard_weights=True`` (under torchrun): the decoder layers'
    weights sharded over every rank, FSDP style, gathered layer by layer (``bagel_engine.weights.sharded``).
    ``devices`` (``"0,1"`` or ``["cuda:0", "cuda:1"]``): the decoder's layers split over these devices of this one
    process (``layer_split``: layers per device; or ``max_memory``: weight budgets, ``"24GB"`` or ``"20GB,24GB"``,
    filled in order as ``device_map="auto"`` does), the rest of the model on the first (``weights.layer_split``).
    ``lora``: LoRA adapter(s) (a PEFT adapter folder, a ``bagel train`` checkpoint directory holding one,
    or an older ``lora_adapter.safetensors``) merged into the weights at load, each scaled by ``lora_strength``.

    The BAGEL family's layouts load as they are (``bagel_engine.weights.layout``): ``ema.safetensors``,
    ``model_bf16.safetensors``, ``model.safetensors``, sharded weights with an index, or one file with its
    configs in the metadata; ``weights_file`` picks a file (or an index). ``base_config``: where configs,
    tokenizer and VAE missing from the directory come from (a directory, a hub id, or ``bagel-7b-mot``, the
    real model's configs shipped in the package). ``task_defaults``: a JSON file (or dict) of per-task
    defaults, as a model directory's ``task_defaults.json`` holds them (it replaces that file).

    A hub id may name a revision (``org/name@rev``, or ``revision=``); ``cache_dir`` and ``token`` default to
    the hub client's (``HF_HUB_CACHE``, ``HF_TOKEN``). With ``device="meta"`` or ``random_weights`` only the
    configs and the tokenizer are downloaded.
    """
    parallel = Parallelism(cfg_parallel_size, tensor_parallel_size, vae_patch_parallel_size, shard_weights, devices,
                           layer_split, max_memory)
    placement_device, groups, spread = parallel.resolve(device, compile, _default_device())
    placement = Placement(
        device=placement_device, dtype=parse_dtype(dtype) or (torch.bfloat16 if placement_device.type == "cuda" else torch.float32),
        official_numerics=official_numerics, quantize=quantize, offload=offload, lora=Placement.adapters(lora),
        lora_strength=lora_strength, random_weights=random_weights, seed=seed, **spread)
    check_backend(attention)
    hub = HubOptions(revision=revision, cache_dir=None if cache_dir is None else str(cache_dir), token=token)
    reads_weights = not random_weights and placement.device.type != "meta"
    model_dir = resolve_model_dir(model, hub, weights=reads_weights)
    checkpoint = find_checkpoint(model_dir, weights_file, base_config, need_weights=reads_weights, hub=hub)
    cfg = checkpoint_config(checkpoint)
    device, dtype = placement.device, placement.dtype
    t0 = time.perf_counter()
    bar = weight_bytes_bar(checkpoint) if progress and reads_weights else None
    bagel, vae = load_modules(checkpoint, cfg, placement, progress=bar.update if bar else None)
    if bar:
        bar.close()
    tokenizer = BagelTokenizer.from_dir(checkpoint.tokenizer_dir or model_dir, fallback=not reads_weights)
    log.info("loaded %s (%s) on %s (%s) in %.1f s", model_dir, checkpoint.describe(), device, dtype,
             time.perf_counter() - t0)
    defaults = checkpoint_task_defaults(checkpoint, task_defaults)
    pipe = BagelPipeline(bagel, vae, tokenizer, cfg, device=device, dtype=dtype, model_name=str(model),
                         official_numerics=official_numerics, task_defaults=defaults, attention=attention)
    vae_tiling = Parallelism.attach(pipe, groups) or vae_tiling
    if compile:
        pipe.compile()
    if vae_tiling:
        pipe.enable_vae_tiling()
    if cfg_parallel_size:
        pipe.enable_cfg_parallel(cfg_parallel_size)
    return pipe


class BagelPipeline:
    """The public face of a loaded model: the official ``interleave`` and the task methods. Each call
    builds its :class:`Request` (params once, from the task defaults and the caller's knobs) and hands
    it to the engine (``bagel_engine.runtime.engine``), which owns the request's stages."""

    def __init__(self, model: Bagel, vae: AutoEncoder, tokenizer: BagelTokenizer, config: ModelConfig, *,
                 device: torch.device, dtype: torch.dtype, model_name: str = "bagel",
                 official_numerics: bool = False, task_defaults: params.TaskDefaults | None = None,
                 attention: str = "auto"):
        self.engine = Engine(model, vae, tokenizer, config, device=device, official_numerics=official_numerics,
                             attention=attention)
        self.model, self.vae, self.tokenizer, self.config = model, vae, tokenizer, config
        # The defaults of the task methods: the official app's, or the model directory's task_defaults.json.
        self.task_defaults = task_defaults or params.TaskDefaults()
        self.device, self.dtype, self.model_name = device, dtype, model_name
        self.official_numerics = official_numerics
        self.tensor_parallel_size = 1  # set by load(tensor_parallel_size=...)

    @property
    def limits(self) -> params.Limits:
        """What one request may ask for (a server sets its own)."""
        return self.engine.limits

    @limits.setter
    def limits(self, value: params.Limits) -> None:
        self.engine.limits = value

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vae_device(self) -> torch.device:
        return self.engine.vae_device

    @property
    def latent_device(self) -> torch.device:
        return self.engine.latent_device

    def check_size(self, height: int, width: int) -> None:
        self.engine.check_size(height, width)

    def prepare_image(self, image: ImageInput, key: object, max_side: int | None = None,
                      vit_from_original: bool = False, resize=None) -> PreparedImage:
        return self.engine.prepare_image(image, key, max_side, vit_from_original, resize)

    def start_batching(self, max_batch: int = 8, max_step_tokens: int | None = None) -> "BagelPipeline":
        """From now on, calls from several threads (a server's clients) are batched step by step by one
        scheduler thread: at most ``max_batch`` requests at once (and ``max_step_tokens`` rows per step's
        forward, when given), each joining within one step."""
        self.engine.start(max_batch, max_step_tokens)
        return self

    def stop_batching(self) -> None:
        self.engine.stop()

    def compile(self, mode: str | None = None) -> "BagelPipeline":
        """Compile the decoder for the denoising and decoding steps (torch.compile, static shapes).
        Default mode: "reduce-overhead" (CUDA graphs) on a GPU, the default mode elsewhere."""
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
        self.engine.decoder_fn = torch.compile(self.model.decoder, dynamic=False, mode=mode)
        return self

    def enable_vae_tiling(self, tile: int = 32, overlap: int = 8) -> "BagelPipeline":
        """Encode and decode images of more than ``tile`` latent positions a side (32: 256 px on BAGEL-7B-MoT)
        in tiles overlapping by ``overlap``, blended: a lower VAE peak at high resolution, an approximation
        of the untiled result (``bagel_engine.runtime.vae_tiling``; its bound in docs/memory.md)."""
        self.engine.vae_tiling = Tiling(tile, overlap)
        return self

    def enable_cfg_parallel(self, size: int) -> "BagelPipeline":
        """Spread each denoising step's guidance branches (conditional, text-unconditional, image-unconditional)
        over ``size`` processes, one branch per rank, under ``torchrun --nproc-per-node SIZE``: every rank runs
        the same calls (prefill and think included), draws the same seed, and gets the same result; the latency
        of a guided step becomes that of one branch. The process group is started here when torchrun's
        variables are set (gloo on the CPU, NCCL on GPUs)."""
        if self.engine.batching:
            raise BagelInputError("CFG-parallel cannot start under a running scheduler (start_batching): every rank "
                                  "must run the same requests")
        groups = parallel_groups(size, self.tensor_parallel_size, self.device)
        self.engine.cfg_parallel, self.engine.lockstep = groups.cfg, groups.lockstep
        return self

    def disable_vae_tiling(self) -> "BagelPipeline":
        self.engine.vae_tiling = None
        return self

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
        negative_prompt: str | None = None,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: str | Sequence[str] | None = None,
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
        Beyond the official arguments: ``negative_prompt`` (images), ``top_p`` / ``top_k`` (sampling) and
        ``stop`` (strings that end an answer), as in the task methods.
        """
        image = ImageParams(cfg_text_scale, cfg_img_scale, tuple(cfg_interval), cfg_renorm_type, cfg_renorm_min,
                            timestep_shift, num_timesteps, enable_taylorseer)
        text = TextParams(max_think_token_n, do_sample, text_temperature, top_p, top_k, params.stop_strings(stop))
        return self.engine.run([Request(
            list(inputs), understanding_output, think, text, image, tuple(image_shapes), seed, noise,
            sample_posterior, callback, on_text, on_step, trace, negative_prompt=negative_prompt or None)])[0]

    # ----------------------------------------------------------------------------- task methods
    def generate(self, prompt: str | Sequence[str], *, height: int | None = None, width: int | None = None,
                 think: bool = False, think_contexts: str = "app", simple_think: bool = False,
                 seed: int | Sequence[int] | None = None, noise: torch.Tensor | Sequence[torch.Tensor] | None = None,
                 callback=None, on_step=None, image_params: ImageParams | None = None,
                 text_params: TextParams | None = None, **knobs) -> BagelOutput | list[BagelOutput]:
        """Text to image, with the official app's defaults (cfg 4.0 / 1.5, interval 0.4-1, global renorm).

        ``prompt`` may be a list: the images are generated together, every denoising step of all of
        them in one batched forward, and a list of outputs is returned. Their seeds are ``seed + k``
        (or a list of seeds), so each image equals the one generated alone with its seed.
        ``height`` / ``width`` and knobs left out take ``self.task_defaults`` (the model directory's
        ``task_defaults.json``, else 1024x1024 and the app's values); ``image_params`` / ``text_params``
        replace those defaults (knobs still apply on top). ``on_step(preview)`` after each denoising step
        (a :class:`StepPreview` per image: the predicted clean latent and its picture).

        ``negative_prompt``: what the picture should not show (it conditions the text-unconditional
        branch of the guidance; empty is none). diffusers' names are understood too (one table,
        ``bagel_engine.knobs``): ``guidance_scale`` (cfg_text_scale), ``num_inference_steps`` (denoising
        steps: num_timesteps = num_inference_steps + 1), ``latents`` (noise), ``generator`` (a
        ``torch.Generator`` draws the seeds) and ``num_images_per_prompt`` (a list comes back, the
        images of each prompt together, seeds ``seed + k``).

        ``think_contexts="eval"``: with ``think``, the guidance contexts of the official benchmark scripts
        (``gen_images_mp_wise.py``: the text-unconditional branch holds no system prompt) instead of the app's;
        ``simple_think``: WISE's option, only the think text after ``</think>`` conditions the picture.
        """
        size = (self.task_defaults.height if height is None else height,
                self.task_defaults.width if width is None else width)
        self.check_size(*size)
        requests, single = task_requests.t2i_requests(
            prompt, size, self.task_defaults.t2i, knobs, seed=seed, noise=noise, think=think,
            think_contexts=think_contexts, simple_think=simple_think, callback=callback, on_step=on_step,
            image_params=image_params, text_params=text_params)
        outs = self.engine.run(requests)
        return outs[0] if single else outs

    def edit(self, images, prompt: str, *, think: bool = False, think_contexts: str = "app", size_from: int = -1,
             seed: int | None = None,
             noise: torch.Tensor | None = None, callback=None, on_step=None, image_params: ImageParams | None = None,
             text_params: TextParams | None = None, **knobs) -> BagelOutput | list[BagelOutput]:
        """Edit one or several images (the output has the last image's resized size); app defaults
        (cfg 4.0 / 2.0, interval 0-1, text_channel renorm). The keywords of ``generate`` apply
        (``negative_prompt``, diffusers' names; with ``num_images_per_prompt`` > 1 a list of edits
        comes back, seeds ``seed + k``). ``think_contexts="eval"``: with ``think``, the think text joins the
        image-unconditional context too, as the official benchmark scripts (GEdit, ImgEdit, KRIS, RISE) do.
        ``size_from``: the input image whose resized size the output takes (-1, the last, as the app; the
        benchmark scripts of several input images take the first, 0)."""
        requests, single = task_requests.edit_requests(
            images, prompt, self.task_defaults.edit, knobs, seed=seed, noise=noise, think=think,
            think_contexts=think_contexts, size_from=size_from, callback=callback, on_step=on_step,
            image_params=image_params, text_params=text_params)
        outs = self.engine.run(requests)
        return outs[0] if single else outs

    def understand(self, images, question: str, *, think: bool = False, max_new_tokens: int | None = None,
                   do_sample: bool = False, text_temperature: float | None = None, seed: int | None = None,
                   callback=None, on_text=None, **knobs) -> BagelOutput:
        """Answer a question about one or several images (``max_new_tokens``: default the model's, else 512).
        ``callback(k, max)`` after each answer token (raise in it to stop); ``on_text(delta)`` with each new
        piece of the answer as it is written (streaming; the pieces add up to ``text``). Sampling:
        ``do_sample`` with ``text_temperature`` (alias ``temperature``), ``top_p``, ``top_k``; ``stop``: strings
        that end the answer (not included)."""
        images = task_requests.as_list(images)
        if not images:
            raise BagelInputError("understand needs at least one input image")
        task_requests.need_prompt(question, "question")
        return self._answer("understand", [*images, question], think,
                            dict(knobs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 text_temperature=text_temperature), seed, callback, on_text)

    def chat(self, prompt: str, *, think: bool = False, max_new_tokens: int | None = None,
             do_sample: bool = False, text_temperature: float | None = None, seed: int | None = None,
             callback=None, on_text=None, **knobs) -> BagelOutput:
        """Text in, text out (``max_new_tokens``: default the model's, else 512); the other keywords as in
        ``understand``."""
        task_requests.need_prompt(prompt, "prompt")
        return self._answer("chat", [prompt], think,
                            dict(knobs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 text_temperature=text_temperature), seed, callback, on_text)

    def _answer(self, task: str, inputs: list, think: bool, knobs: dict, seed: int | None, callback,
                on_text) -> BagelOutput:
        tokens = self.task_defaults.understand_tokens if task == "understand" else self.task_defaults.chat_tokens
        return self.engine.run([task_requests.answer_request(task, inputs, think, knobs, tokens, seed, callback,
                                                             on_text)])[0]
