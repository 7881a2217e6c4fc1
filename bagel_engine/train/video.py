"""Video rows of LLaVA-style conversations (``{"video": ..., "conversations": [... "<video>" ...]}``): frames
sampled by the official trainer's rules (``data/video_utils.py``'s ``FrameSampler``), each frame an image of the
conversation, ``<video>`` standing for as many ``<image>``.

The rules, as the official code applies them: a frame count drawn uniformly in ``[min_num_frames, max_num_frames]``
(a group's ``frame_sampler_args``; the example config's 8 and 12 by default); the video cut into that many equal
intervals (``linspace(0, frames, count + 1)``, truncated), one frame drawn in each (not its interval's last), a
random sorted subset when an interval is empty, the last frame repeated when the video is shorter than the count.
A folder of frames (``..._<n>.jpg``, in the order of ``n``) is sampled the same way, and only when it holds more
frames than the count. The draws come from the row's own random generator (so a resumed run draws the same frames),
not the official code's unseeded global ones: the same distribution, not the same frames.

Decoding: a folder needs nothing; an animated GIF / WebP / PNG is read by Pillow; other containers (mp4, webm ...)
by PyAV when it is installed (``pip install av``; the official trainer uses decord), else a clear error.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from bagel_engine.params import BagelInputError


@dataclass(frozen=True)
class FrameSampling:
    max_num_frames: int = 12
    min_num_frames: int = 8

    @classmethod
    def from_args(cls, args) -> "FrameSampling":
        """A group's ``frame_sampler_args`` (None: the defaults)."""
        if not args:
            return cls()
        if not isinstance(args, dict):
            raise BagelInputError(f"frame_sampler_args must be a mapping, not {args!r:.60}")
        out = cls(int(args.get("max_num_frames", cls.max_num_frames)), int(args.get("min_num_frames", cls.min_num_frames)))
        if not 1 <= out.min_num_frames <= out.max_num_frames:
            raise BagelInputError(f"frame_sampler_args: need 1 <= min_num_frames <= max_num_frames, got {args}")
        return out

    def count(self, rng: random.Random) -> int:
        return rng.randint(self.min_num_frames, self.max_num_frames)


def frame_indices(length: int, count: int, rng: random.Random) -> list[int]:
    """``count`` frame indices of a video of ``length`` frames (see the module doc)."""
    if length < 1:
        raise BagelInputError("the video has no frames")
    n = min(count, length)
    edges = [int(i * length / n) for i in range(n + 1)]
    spans = [(edges[i], edges[i + 1] - 1) for i in range(n)]
    if all(b > a for a, b in spans):
        picked = [rng.randrange(a, b) for a, b in spans]
    else:
        picked = sorted(rng.sample(range(length), n))
    return picked + [picked[-1]] * (count - len(picked))


def _frame_number(path: Path) -> int:
    m = re.search(r"_(\d+)\.jpg$", path.name)
    return int(m.group(1)) if m else -1


def read_frames(path: Path, sampling: FrameSampling, rng: random.Random) -> list:
    """The sampled frames of a video file or a folder of frames, as RGB pictures."""
    from PIL import Image, ImageSequence

    path = Path(path)
    count = sampling.count(rng)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.is_file()), key=lambda p: (_frame_number(p), p.name))
        if not files:
            raise BagelInputError(f"the frame folder {path} is empty")
        if len(files) > count:
            files = [files[i] for i in frame_indices(len(files), count, rng)]
        return [Image.open(f).convert("RGB") for f in files]
    if not path.is_file():
        raise BagelInputError(f"no video {path}")
    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:  # an animated GIF / WebP / PNG
                frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(image)]
                return [frames[i] for i in frame_indices(len(frames), count, rng)]
    except OSError:
        pass  # not a picture format: a video container
    try:
        import av
    except ImportError:
        raise BagelInputError(f"{path.name}: decoding video files needs PyAV (pip install av), or give a folder of "
                              "frames") from None
    try:
        with av.open(str(path)) as container:
            frames = [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError) as e:  # type: ignore[attr-defined]
        raise BagelInputError(f"{path.name}: cannot decode the video ({e})") from None
    return [frames[i] for i in frame_indices(len(frames), count, rng)]


def expand_video_placeholder(turns: list[tuple[str, str]], frames: int) -> list[tuple[str, str]]:
    """``<video>`` in the first turn that has it becomes ``frames`` x ``<image>`` (the official rule)."""
    for i, (role, text) in enumerate(turns):
        if "<video>" in text:
            return [*turns[:i], (role, text.replace("<video>", "<image>" * frames, 1)), *turns[i + 1:]]
    raise BagelInputError("a video row's conversation has no <video> placeholder")
