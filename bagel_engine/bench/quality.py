"""How far an option moves the result: latent cosine similarity and PSNR of decoded images
against a baseline run with the same seeds and prompts (and, for text, how much of the answer
stays the same)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def latent_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two latents flattened (float64); 1.0 means the same direction."""
    x, y = a.detach().double().flatten().cpu(), b.detach().double().flatten().cpu()
    if x.shape != y.shape:
        raise ValueError(f"latents differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    denom = float(x.norm() * y.norm())
    if denom == 0.0:
        return 1.0 if float((x - y).abs().max()) == 0.0 else 0.0
    return float(x @ y) / denom


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB of two 8-bit RGB images; ``inf`` when they are identical."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {a.size} vs {b.size}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def max_pixel_diff(a: Image.Image, b: Image.Image) -> int:
    x = np.asarray(a.convert("RGB"), dtype=np.int16)
    y = np.asarray(b.convert("RGB"), dtype=np.int16)
    return int(np.abs(x - y).max())


def common_prefix_fraction(a: str, b: str) -> float:
    """Share of the longer text that both texts start with (1.0: the same answer)."""
    if not a and not b:
        return 1.0
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(a), len(b))


def compare_outputs(baseline: list, other: list) -> dict:
    """Quality figures of ``other`` against ``baseline`` (lists of BagelOutput of the same requests):
    mean latent cosine, mean and worst PSNR, worst pixel difference; for text, exact matches and
    the mean shared prefix."""
    report: dict = {}
    pairs = list(zip(baseline, other))
    if pairs and all(a.latents is not None and b.latents is not None for a, b in pairs):
        cos = [latent_cosine(a.latents, b.latents) for a, b in pairs]
        report["latent_cosine"] = sum(cos) / len(cos)
        report["latent_cosine_min"] = min(cos)
    if pairs and all(a.image is not None and b.image is not None for a, b in pairs):
        values = [psnr(a.image, b.image) for a, b in pairs]
        finite = [v for v in values if math.isfinite(v)]
        # The mean over finite values; an identical image contributes no error: report inf only if all are.
        report["psnr_db"] = math.inf if not finite else 10 * math.log10(
            len(values) / sum(10 ** (-v / 10) for v in finite))
        report["psnr_db_min"] = min(values)
        report["max_pixel_diff"] = max(max_pixel_diff(a.image, b.image) for a, b in pairs)
    if pairs and all(a.text is not None and b.text is not None for a, b in pairs) and not report:
        report["text_exact"] = sum(a.text == b.text for a, b in pairs) / len(pairs)
        report["text_prefix"] = sum(common_prefix_fraction(a.text, b.text) for a, b in pairs) / len(pairs)
    return report
