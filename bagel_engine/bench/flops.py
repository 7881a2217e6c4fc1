"""How much arithmetic a BAGEL workload needs: a FLOP model computed from the ``ModelConfig`` alone.

What is counted (the model's work, not any particular implementation's):

- every matrix product as ``2*M*N*K`` (linear layers, convolutions as ``2*Cin*Cout*k*k*Hout*Wout``);
- attention as ``QK^T`` plus ``PV``: ``4 * pairs * heads * head_dim`` per layer, where ``pairs`` is
  the number of (query, key) pairs actually attended (causal text blocks attend to their prefix,
  image blocks to the whole block);
- not counted: norms, activations, RoPE, softmax, biases, embeddings lookups, the guidance combine
  and the Euler update (all O(tokens x hidden), negligible next to the products).

A denoising *branch-step* runs the ``n + 2`` tokens of the latent block (``n`` latents through the
generation expert, the two image markers through the understanding expert: the same shapes)
against one guidance branch's context. Per step, the branches are: the conditional one always; on
the steps inside ``cfg_interval`` (and with ``cfg_text_scale > 1``), the text-unconditional one,
and the image-unconditional one when ``cfg_img_scale > 1`` and its context differs from the
others (in text-to-image it equals the conditional context, so it costs nothing: the engine runs
a branch whose context equals another's once, and so does this count).

For the real model at 1024x1024 (4,096 latent tokens) one branch-step is ~60 TFLOP; the issue's
text-to-image workload (50 points, cfg 4 / 1, interval 0.4-1) has 41 guided steps of 49, so
41 * 2 + 8 = 90 branch-steps, ~5.4 PFLOP.

The schedule is re-implemented here on purpose (a few lines), so that the count does not depend
on the sampler's code; the tests check it against the engine's own. The resize rule is the
engine's (``runtime.image_transforms.resize_size``), as in the memory plan.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from bagel_engine.weights.config import LLMConfig, ModelConfig, VAEConfig, ViTConfig
from bagel_engine.runtime.image_transforms import resize_size

# ----------------------------------------------------------------------------- schedule


def shifted_timesteps(num_timesteps: int, shift: float) -> torch.Tensor:
    """``t_i = shift*s / (1 + (shift-1)*s)`` for ``s = linspace(1, 0, N)`` in float32 (official)."""
    s = torch.linspace(1, 0, num_timesteps)
    return shift * s / (1 + (shift - 1) * s)


def guided_steps(num_timesteps: int, timestep_shift: float, cfg_interval: tuple[float, float],
                 cfg_text_scale: float) -> list[bool]:
    """For each of the ``N - 1`` denoising steps: whether the guidance branches run.

    Guidance is active when ``lo < t <= hi`` (compared in float32, as the official code does) and
    the text scale is above 1 (the image branch is only ever used together with the text branch).
    """
    if cfg_text_scale <= 1.0:
        return [False] * (num_timesteps - 1)
    ts = shifted_timesteps(num_timesteps, timestep_shift)
    lo, hi = (float(x) for x in cfg_interval)
    return [bool(ts[i] > lo) and bool(ts[i] <= hi) for i in range(num_timesteps - 1)]


# ----------------------------------------------------------------------------- image sizes


def input_image_tokens(cfg: ModelConfig, width: int, height: int) -> tuple[tuple[int, int], int, int]:
    """For an input image of ``width x height``: its VAE size (w, h) (the edit output size), its
    number of latent tokens and its number of ViT patches."""
    vae_w, vae_h = resize_size(width, height, *cfg.bagel.vae_transform)
    vit_w, vit_h = resize_size(vae_w, vae_h, *cfg.bagel.vit_transform)
    d, p = cfg.latent_downsample, cfg.vit.patch_size
    return (vae_w, vae_h), (vae_h // d) * (vae_w // d), (vit_h // p) * (vit_w // p)


def estimate_text_tokens(text: str) -> int:
    """Tokens of one framed text segment, estimated (~4 bytes per BPE token for English, plus
    ``<|im_start|>`` / ``<|im_end|>``). Prompts are a sliver of the work, so an estimate is enough."""
    return max(1, math.ceil(len(text.encode("utf-8")) / 4)) + 2


# ----------------------------------------------------------------------------- building blocks


def llm_linear_per_token(llm: LLMConfig) -> float:
    """Matmul FLOPs of one token through all decoder layers (one expert; both have the same shapes)."""
    d, hd = llm.hidden_size, llm.head_dim
    q, kv = llm.num_attention_heads * hd, llm.num_key_value_heads * hd
    per_layer = 2 * (d * q + 2 * d * kv + q * d + 3 * d * llm.intermediate_size)
    return float(per_layer * llm.num_hidden_layers)


def llm_attention(llm: LLMConfig, pairs: float) -> float:
    """QK^T and PV over ``pairs`` (query, key) pairs, all layers."""
    return 4.0 * pairs * llm.num_attention_heads * llm.head_dim * llm.num_hidden_layers


def causal_pairs(past: int, new: int) -> float:
    """Pairs attended by ``new`` causal tokens after ``past`` cached ones."""
    return float(new * past + new * (new + 1) // 2)


def full_pairs(past: int, new: int) -> float:
    """Pairs attended by a block of ``new`` tokens that see each other fully, after ``past``."""
    return float(new * (past + new))


def lm_head_per_token(llm: LLMConfig) -> float:
    return 2.0 * llm.hidden_size * llm.vocab_size


def vit_flops(vit: ViTConfig, llm_hidden: int, patches: int) -> float:
    """SigLIP over one image of ``patches`` patches (full attention) plus the connector to the LLM."""
    dv, i = vit.hidden_size, vit.intermediate_size
    embed = 2.0 * vit.num_channels * vit.patch_size**2 * dv * patches
    per_layer = 2.0 * (4 * dv * dv + 2 * dv * i) * patches + 4.0 * patches * patches * dv
    connector = 2.0 * (dv * llm_hidden + llm_hidden * llm_hidden) * patches
    return embed + per_layer * vit.num_hidden_layers + connector


def _conv(cin: int, cout: int, k: int, pixels: int) -> float:
    return 2.0 * cin * cout * k * k * pixels


def _resnet(cin: int, cout: int, pixels: int) -> float:
    out = _conv(cin, cout, 3, pixels) + _conv(cout, cout, 3, pixels)
    return out + (_conv(cin, cout, 1, pixels) if cin != cout else 0.0)


def _vae_attn(c: int, pixels: int) -> float:
    return 4 * _conv(c, c, 1, pixels) + 4.0 * pixels * pixels * c


def _vae_mid(c: int, pixels: int) -> float:
    return 2 * _resnet(c, c, pixels) + _vae_attn(c, pixels)


def vae_decode_flops(vae: VAEConfig, height: int, width: int) -> float:
    """The FLUX decoder from a (z, H/d, W/d) latent to an H x W image."""
    widths = [vae.ch * m for m in vae.ch_mult]
    d = vae.downsample
    h, w = height // d, width // d
    prev = widths[-1]
    total = _conv(vae.z_channels, prev, 3, h * w) + _vae_mid(prev, h * w)
    for i in reversed(range(len(widths))):
        for j in range(vae.num_res_blocks + 1):
            total += _resnet(prev if j == 0 else widths[i], widths[i], h * w)
        prev = widths[i]
        if i:
            h, w = h * 2, w * 2
            total += _conv(prev, prev, 3, h * w)
    return total + _conv(prev, vae.out_ch, 3, h * w)


def vae_encode_flops(vae: VAEConfig, height: int, width: int) -> float:
    """The FLUX encoder from an H x W image to its (2z, H/d, W/d) moments."""
    widths = [vae.ch * m for m in vae.ch_mult]
    h, w = height, width
    total = _conv(vae.in_channels, vae.ch, 3, h * w)
    prev = vae.ch
    for i, width_i in enumerate(widths):
        for j in range(vae.num_res_blocks):
            total += _resnet(prev if j == 0 else width_i, width_i, h * w)
        prev = width_i
        if i != len(widths) - 1:
            h, w = h // 2, w // 2
            total += _conv(prev, prev, 3, h * w)
    return total + _vae_mid(prev, h * w) + _conv(prev, 2 * vae.z_channels, 3, h * w)


def latent_io_per_token(cfg: ModelConfig) -> float:
    """vae2llm on the way in and llm2vae on the way out, per latent token."""
    return 2 * 2.0 * cfg.patch_latent_dim * cfg.llm.hidden_size


def branch_step_flops(cfg: ModelConfig, latent_tokens: int, context_len: int) -> float:
    """One denoising forward of one branch: ``n + 2`` tokens against ``context_len`` cached ones."""
    q = latent_tokens + 2
    return (llm_linear_per_token(cfg.llm) * q + llm_attention(cfg.llm, full_pairs(context_len, q))
            + latent_io_per_token(cfg) * latent_tokens)


def decode_flops(cfg: ModelConfig, context_len: int, forwards: int) -> float:
    """``forwards`` one-token decoder steps starting after ``context_len`` cached tokens, each with the LM head."""
    if forwards <= 0:
        return 0.0
    # Step k (0-based) attends to context_len + k + 1 keys.
    pairs = forwards * context_len + forwards * (forwards + 1) / 2
    return forwards * (llm_linear_per_token(cfg.llm) + lm_head_per_token(cfg.llm)) + llm_attention(cfg.llm, pairs)


# ----------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one request (one image or one answer) by phase."""

    prefill: float = 0.0  # ViT, VAE encode and the LLM over the contexts
    denoise: float = 0.0
    vae_decode: float = 0.0
    decode: float = 0.0  # text decoding
    steps: int = 0  # denoising updates (N - 1)
    guided_steps: int = 0
    branches_per_guided_step: int = 0
    branch_steps: int = 0
    latent_tokens: int = 0
    context_tokens: int = 0  # the conditional context
    cond_branch_step: float = 0.0  # one forward of the conditional branch
    decode_forwards: int = 0

    @property
    def total(self) -> float:
        return self.prefill + self.denoise + self.vae_decode + self.decode

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _denoise(cfg: ModelConfig, height: int, width: int, branch_contexts: list[int], guided: list[bool],
             prefill: float) -> FlopCount:
    """``branch_contexts``: context lengths of the distinct branches, the conditional one first."""
    d = cfg.latent_downsample
    n = (height // d) * (width // d)
    per_branch = [branch_step_flops(cfg, n, length) for length in branch_contexts]
    guided_count = sum(guided)
    plain = len(guided) - guided_count
    return FlopCount(
        prefill=prefill,
        denoise=guided_count * sum(per_branch) + plain * per_branch[0],
        vae_decode=vae_decode_flops(cfg.vae, height, width),
        steps=len(guided),
        guided_steps=guided_count,
        branches_per_guided_step=len(branch_contexts),
        branch_steps=guided_count * len(branch_contexts) + plain,
        latent_tokens=n,
        context_tokens=branch_contexts[0],
        cond_branch_step=per_branch[0],
    )


def text_to_image_flops(cfg: ModelConfig, *, height: int, width: int, prompt_tokens: int, num_timesteps: int = 50,
                        cfg_text_scale: float = 4.0, cfg_img_scale: float = 1.5,
                        cfg_interval: tuple[float, float] = (0.4, 1.0), timestep_shift: float = 3.0) -> FlopCount:
    """One text-to-image request. Contexts: conditional = the prompt; text-unconditional = empty;
    image-unconditional = the prompt again (the conditional context: never an extra branch)."""
    llm = cfg.llm
    prefill = llm_linear_per_token(llm) * prompt_tokens + llm_attention(llm, causal_pairs(0, prompt_tokens))
    guided = guided_steps(num_timesteps, timestep_shift, cfg_interval, cfg_text_scale)
    return _denoise(cfg, height, width, [prompt_tokens, 0], guided, prefill)


def edit_flops(cfg: ModelConfig, *, image_width: int, image_height: int, prompt_tokens: int, num_timesteps: int = 50,
               cfg_text_scale: float = 4.0, cfg_img_scale: float = 2.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
               timestep_shift: float = 3.0) -> FlopCount:
    """One edit of one input image. Contexts: conditional = [VAE image, ViT image, prompt];
    text-unconditional = [VAE image, ViT image] (a prefix: free); image-unconditional = [prompt]
    (computed once more in the prefill)."""
    llm = cfg.llm
    (vae_w, vae_h), n_in, m = input_image_tokens(cfg, image_width, image_height)
    lin = llm_linear_per_token(llm)
    l1 = n_in + 2
    l2 = l1 + m + 2
    prefill = (vae_encode_flops(cfg.vae, vae_h, vae_w) + latent_io_per_token(cfg) / 2 * n_in
               + lin * l1 + llm_attention(llm, full_pairs(0, l1))
               + vit_flops(cfg.vit, llm.hidden_size, m) + lin * (m + 2) + llm_attention(llm, full_pairs(l1, m + 2))
               + lin * prompt_tokens + llm_attention(llm, causal_pairs(l2, prompt_tokens))
               + lin * prompt_tokens + llm_attention(llm, causal_pairs(0, prompt_tokens)))
    guided = guided_steps(num_timesteps, timestep_shift, cfg_interval, cfg_text_scale)
    branches = [l2 + prompt_tokens, l2] + ([prompt_tokens] if cfg_img_scale > 1.0 else [])
    return _denoise(cfg, vae_h, vae_w, branches, guided, prefill)


def understand_flops(cfg: ModelConfig, *, image_width: int, image_height: int, prompt_tokens: int,
                     new_tokens: int) -> FlopCount:
    """One question about one image, answered with ``new_tokens`` tokens (decoding feeds the start
    token first, so it runs ``new_tokens + 1`` one-token steps)."""
    llm = cfg.llm
    (vae_w, vae_h), _, m = input_image_tokens(cfg, image_width, image_height)
    lin = llm_linear_per_token(llm)
    context = m + 2 + prompt_tokens
    prefill = (vit_flops(cfg.vit, llm.hidden_size, m) + lin * (m + 2) + llm_attention(llm, full_pairs(0, m + 2))
               + lin * prompt_tokens + llm_attention(llm, causal_pairs(m + 2, prompt_tokens)))
    return FlopCount(prefill=prefill, decode=decode_flops(cfg, context, new_tokens + 1), context_tokens=context,
                     decode_forwards=new_tokens + 1)


def chat_flops(cfg: ModelConfig, *, prompt_tokens: int, new_tokens: int) -> FlopCount:
    llm = cfg.llm
    prefill = llm_linear_per_token(llm) * prompt_tokens + llm_attention(llm, causal_pairs(0, prompt_tokens))
    return FlopCount(prefill=prefill, decode=decode_flops(cfg, prompt_tokens, new_tokens + 1),
                     context_tokens=prompt_tokens, decode_forwards=new_tokens + 1)


# ----------------------------------------------------------------------------- training
def packed_attention_pairs(sample_lens: list[int], split_lens: list[int], split_modes: list[int]) -> float:
    """(query, key) pairs the official training mask lets attend in a packed sequence: a causal
    split sees its sample's earlier visible tokens and its own prefix, an image split its sample's
    earlier visible tokens and itself; nothing sees an earlier noisy split (mode 2)."""
    pairs, splits = 0.0, iter(zip(split_lens, split_modes))
    for sample_len in sample_lens:
        seen, visible = 0, 0
        while seen < sample_len:
            length, mode = next(splits)
            pairs += causal_pairs(visible, length) if mode == 0 else full_pairs(visible, length)
            seen += length
            visible += 0 if mode == 2 else length
    return pairs


def training_forward_flops(cfg: ModelConfig, *, length: int, pairs: float, vit_images: list[int],
                           vae_images: list[tuple[int, int]], latent_tokens: int, mse_tokens: int,
                           ce_tokens: int) -> dict[str, float]:
    """Forward FLOPs of one packed training sequence, by part. ``vit_images``: patches per ViT
    image; ``vae_images``: pixel sizes (H, W) of the images the VAE encodes (no gradient)."""
    llm = cfg.llm
    decoder = llm_linear_per_token(llm) * length + llm_attention(llm, pairs)
    vit = sum(vit_flops(cfg.vit, llm.hidden_size, p) for p in vit_images)
    heads = (lm_head_per_token(llm) * ce_tokens + latent_io_per_token(cfg) / 2 * (latent_tokens + mse_tokens))
    vae = sum(vae_encode_flops(cfg.vae, h, w) for h, w in vae_images)
    return {"decoder": decoder, "vit": vit, "heads": heads, "vae_encode": vae}
