"""What one measured ``--compare`` option set leaves in its folder, and how it is read back: the contract
between the benchmark (``bench.runner``) and the process that measures the set (``bench.worker``).

``result.json``: the figures, or ``{"status": "failed", "error": ...}``; ``latents.pt``: the first
measured run's latents; ``image-K.png``: its pictures (texts are in ``result.json``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from bagel_engine.bench.workloads import Workload

RESULT, LATENTS = "result.json", "latents.pt"


def workload_from_dict(d: dict) -> Workload:
    d = dict(d)
    if d.get("cfg_interval") is not None:
        d["cfg_interval"] = tuple(d["cfg_interval"])
    return Workload(**d)


def write_outputs(outputs: list, out_dir: Path) -> list:
    """Save the outputs' latents and pictures; returns their texts (for ``result.json``)."""
    torch.save([None if o.latents is None else o.latents.cpu() for o in outputs], out_dir / LATENTS)
    for k, o in enumerate(outputs):
        if o.image is not None:
            o.image.save(out_dir / f"image-{k}.png")
    return [o.text for o in outputs]


def read_outputs(out_dir: Path, result: dict) -> list:
    """The first measured run's outputs as ``BagelOutput`` objects (latents, images, texts)."""
    from bagel_engine import BagelOutput

    latents = torch.load(out_dir / LATENTS) if (out_dir / LATENTS).exists() else []
    outputs = []
    for k, text in enumerate(result.get("texts") or []):
        path = out_dir / f"image-{k}.png"
        image = Image.open(path).convert("RGB") if path.exists() else None
        outputs.append(BagelOutput(text=text, image=image, latents=latents[k] if k < len(latents) else None))
    return outputs
