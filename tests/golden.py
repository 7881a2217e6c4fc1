"""Access to the golden vectors of the official code (tests/data/tiny-v1, see its README)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "data" / "tiny-v1"
MODEL_DIR = GOLDEN / "model"
REAL_CONFIG_DIR = Path(__file__).parent / "data" / "bagel-7b-mot"


@lru_cache(maxsize=None)
def cases() -> dict[str, dict]:
    data = json.loads((GOLDEN / "cases.json").read_text())
    return {c["name"]: c for c in data["cases"]}


@lru_cache(maxsize=None)
def tensors(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / cases()[name]["tensors_file"]))


def inputs(name: str) -> list:
    out = []
    for item in cases()[name]["inputs"]:
        out.append(item["text"] if item["type"] == "text" else Image.open(GOLDEN / item["path"]))
    return out


def image_cases() -> list[str]:
    return [n for n, c in cases().items() if not c["params"].get("understanding_output")]


def text_cases() -> list[str]:
    return [n for n, c in cases().items() if c["params"].get("understanding_output")]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, what: str = "") -> None:
    actual = actual.detach().float().cpu()
    expected = expected.float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != golden {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    worst = float((diff - bound).max()) if diff.numel() else 0.0
    assert worst <= 0, f"{what}: max |diff| {float(diff.max()):.3g} exceeds atol {atol} rtol {rtol}"


def assert_uint8_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """|d| <= 1 everywhere and on at most 0.5% of values (the golden README's image tolerance)."""
    d = (actual.to(torch.int16) - expected.to(torch.int16)).abs()
    assert int(d.max()) <= 1, f"{what}: a pixel differs by {int(d.max())}"
    frac = float((d > 0).float().mean())
    assert frac <= 0.005, f"{what}: {frac:.2%} of values differ (max 0.5%)"
