"""Writing safetensors files that others can read.

``safetensors.torch.save_file`` creates its files with mode 0600 (owner only), unlike every other file a
program writes (0666 less the umask: 0644 usually). A checkpoint shared with a team, or served from a
group-readable folder, must not be owner-only: :func:`save_safetensors` writes the file and gives it the
mode the umask allows.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """The mode a new file gets here (0o666 less the umask)."""
    return 0o666 & ~_umask()


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, default_mode())
