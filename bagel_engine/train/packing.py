"""Packing samples into one sequence: token ids, image tokens, RoPE positions, routing, loss
targets and the attention mask, following the official training layout.

Within a sample (positions restart at 0 for each sample):

- a text split of ``l`` tokens takes positions ``r .. r+l-1``; every image split takes the one
  position ``r`` for all its tokens (markers included), then ``r += 1``; a *target* image takes ``r``
  without advancing it (at inference the noisy block never enters the cache, so the text after it
  continues from the same position);
- a dropped text segment leaves no trace; a dropped image still advances ``r`` by one (an
  official training quirk, kept because it is how the released weights were trained).

The mask (the official ``create_sparse_mask``): a query sees a key of its own sample when the key
is not after it, or when both are in the same image split; nobody outside a noisy target split
sees its keys. Text and ViT tokens and all image markers go to the understanding expert, VAE
latents (clean or noisy) to the generation expert.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from bagel_engine.model.kv_cache import SampleBlocks
from bagel_engine.runtime import image_transforms
from bagel_engine.runtime.context import PreparedImage
from bagel_engine.runtime.tokenizer import BagelTokenizer
from bagel_engine.train.sample import Dropout, Sample, Text
from bagel_engine.weights.config import ModelConfig

CAUSAL, FULL, NOISE = 0, 1, 2


@dataclass
class VaeImage:
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    grid: tuple[int, int]  # latent tokens per side (h, w)
    target: bool  # noised and learnt (else clean conditioning, t = 0)


@dataclass
class PackedBatch:
    """One packed sequence of ``length`` tokens (several samples back to back)."""

    length: int
    text_ids: torch.Tensor  # (Nt,) ids of the text tokens and image markers
    text_indexes: torch.Tensor  # (Nt,) their rows in the sequence
    position_ids: torch.Tensor  # (T,) RoPE positions
    vit_patches: torch.Tensor  # (Nv, 3*p*p)
    vit_position_ids: torch.Tensor  # (Nv,) rows of vit_pos_embed
    vit_seqlens: list[int]
    vit_indexes: torch.Tensor  # (Nv,)
    vae_images: list[VaeImage]
    latent_position_ids: torch.Tensor  # (Nl,) rows of latent_pos_embed
    vae_indexes: torch.Tensor  # (Nl,) rows of every latent token, image after image
    ce_indexes: torch.Tensor  # (Nc,) rows whose next token is learnt
    ce_labels: torch.Tensor  # (Nc,)
    sample_lens: list[int]
    split_lens: list[int]
    split_modes: list[int]  # CAUSAL / FULL / NOISE per split
    names: list[str] = field(default_factory=list)
    # (Nc,) the official CE reweighting (``len2weight``, "square"): each learnt text's tokens weigh
    # 1 / sqrt(its token count), so that long answers do not drown short ones (used with ce_reweighting)
    ce_weights: torch.Tensor | None = None

    @property
    def mse_tokens(self) -> int:
        return sum(im.grid[0] * im.grid[1] for im in self.vae_images if im.target)

    @property
    def ce_tokens(self) -> int:
        return int(self.ce_indexes.numel())

    def padded(self, length: int, pad_id: int) -> "PackedBatch":
        """The same sequence followed by ``length - self.length`` padding tokens: a sample of its own
        (seen by nobody else), causal, with no loss. Fixed lengths keep the attention kernels'
        shapes static (compiled flex attention would otherwise recompile for every new length)."""
        extra = length - self.length
        if extra < 0:
            raise ValueError(f"cannot pad a sequence of {self.length} tokens to {length}")
        if extra == 0:
            return self
        rows = torch.arange(self.length, length)
        return replace(self, length=length, text_ids=torch.cat([self.text_ids, torch.full((extra,), pad_id)]),
                       text_indexes=torch.cat([self.text_indexes, rows]),
                       position_ids=torch.cat([self.position_ids, torch.arange(extra)]),
                       sample_lens=[*self.sample_lens, extra], split_lens=[*self.split_lens, extra],
                       split_modes=[*self.split_modes, CAUSAL], names=[*self.names, "(padding)"])

    def und_indexes(self) -> torch.Tensor:
        return torch.cat([self.text_indexes, self.vit_indexes]).sort().values

    def split_ids(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per token: its sample, its split and its split's mode."""
        doc = torch.repeat_interleave(torch.arange(len(self.sample_lens)), torch.tensor(self.sample_lens))
        split = torch.repeat_interleave(torch.arange(len(self.split_lens)), torch.tensor(self.split_lens))
        mode = torch.tensor(self.split_modes)[split]
        return doc, split, mode

    def mask_mod(self, device=None):
        """The official rule as a flex-attention ``mask_mod(b, h, q, k)``: the key is in the query's
        sample and not after it, or both are in the same image split; no key of a noisy split is seen
        from outside it. On index tensors that broadcast, it gives the dense mask too."""
        doc, split, mode = (t.to(device) for t in self.split_ids())

        def mask_mod(b, h, q, k):
            same_split = split[q] == split[k]
            visible = (k <= q) | (same_split & (mode[q] != CAUSAL))
            return visible & ~((mode[k] == NOISE) & ~same_split) & (doc[q] == doc[k])

        return mask_mod

    def dense_mask(self, device=None) -> torch.Tensor:
        """(T, T) bool: which keys (columns) each query (row) sees."""
        idx = torch.arange(self.length, device=device)
        return self.mask_mod(device)(None, None, idx[:, None], idx[None, :])

    def sample_blocks(self, device=None) -> SampleBlocks:
        """The same mask as one dense block per sample (samples never see each other): attention
        span by span, much cheaper than the dense (T, T) mask for many short samples (the CPU path)."""
        full = self.mask_mod(device)
        spans, masks, start = [], [], 0
        for n in self.sample_lens:
            idx = torch.arange(start, start + n, device=device)
            spans.append((start, start + n))
            masks.append(full(None, None, idx[:, None], idx[None, :]))
            start += n
        return SampleBlocks(tuple(spans), tuple(masks))

    def block_mask(self, device, block_size: int = 128):
        """The same mask as a flex-attention ``BlockMask`` (long sequences on a GPU)."""
        from torch.nn.attention.flex_attention import create_block_mask

        mask_mod = self.mask_mod(device)
        device = torch.device(device)
        return create_block_mask(mask_mod, 1, None, self.length, self.length, device=device, BLOCK_SIZE=block_size,
                                 _compile=device.type == "cuda")  # compiled as the official code does


class SequencePacker:
    """Turns samples into packed sequences. ``prepare(image, key)`` resizes an image with the model's VAE and
    ViT transforms (``BagelPipeline.prepare_image``); a sample with its own ``transforms`` calls
    ``prepare(image, key, resize=transforms)``."""

    def __init__(self, config: ModelConfig, tokenizer: BagelTokenizer,
                 prepare: Callable[[object, object], PreparedImage], dropout: Dropout | None = None,
                 rng: random.Random | None = None, visual_gen: bool = True, visual_und: bool = True):
        self.cfg, self.tokenizer, self.prepare = config, tokenizer, prepare
        self.dropout = dropout or Dropout(0.0, 0.0, 0.0)
        self.rng = rng or random.Random(0)
        # The official switches: without visual_und no ViT token is made (ViT conditions are left out and a
        # sample that needs the ViT is refused); without visual_gen a sample with an image to generate or a
        # VAE condition is refused.
        self.visual_gen, self.visual_und = visual_gen, visual_und

    def check(self, sample: Sample) -> None:
        """Raise ``ValueError`` when the sample needs a part that this run leaves out."""
        pictures = [s for s in sample.segments if not isinstance(s, Text)]
        if not self.visual_gen and any(p.target or p.as_vae for p in pictures):
            raise ValueError("it has an image to generate or a VAE condition, and this run trains without the "
                             "generation expert (--no-visual-gen)")
        if not self.visual_und and pictures and not any(p.target or p.as_vae for p in pictures):
            raise ValueError("it needs the ViT to see its image(s), and this run trains without it (--no-visual-und)")

    def prepared(self, segment, sample: Sample) -> PreparedImage:
        """A picture through the model's resize rules, or the sample's own (``prepare(image, key, resize=...)``)."""
        if sample.transforms is None:
            return self.prepare(segment.image, id(segment))
        return self.prepare(segment.image, id(segment), resize=sample.transforms)

    # -- sizes
    def _latent_grid(self, image: PreparedImage) -> tuple[int, int]:
        d = self.cfg.latent_downsample
        return image.vae_pixels.shape[1] // d, image.vae_pixels.shape[2] // d

    def _vit_grid(self, image: PreparedImage) -> tuple[int, int]:
        p = self.cfg.vit.patch_size
        return image.vit_pixels.shape[1] // p, image.vit_pixels.shape[2] // p

    def _dropped(self, segment) -> bool:
        if not segment.droppable:
            return False
        if isinstance(segment, Text):
            p = self.dropout.text
        else:
            p = self.dropout.vit if segment.as_vit else self.dropout.vae
        return p > 0 and self.rng.random() < p

    def pack(self, samples: list[Sample]) -> PackedBatch:
        s = self.tokenizer.special
        b = _Buffers()
        for sample in samples:
            self.check(sample)
            start, rope = b.length, 0
            for segment in sample.segments:
                if not self.visual_und and not isinstance(segment, Text) and segment.as_vit and not segment.as_vae:
                    continue  # no ViT in this run: the condition is not there at all
                if self._dropped(segment):
                    rope += 0 if isinstance(segment, Text) else 1
                    continue
                if isinstance(segment, Text):
                    ids = self.tokenizer.frame(segment.text)
                    rows = b.take(len(ids))
                    b.text(ids, rows)
                    if segment.loss:
                        b.ce_indexes += rows[:-1]
                        b.ce_labels += ids[1:]
                        b.ce_weights += [1.0 / (len(ids) - 1) ** 0.5] * (len(ids) - 1)
                    b.positions += list(range(rope, rope + len(ids)))
                    rope += len(ids)
                    b.split(len(ids), CAUSAL)
                    continue
                image = self.prepared(segment, sample)
                if segment.target or segment.as_vae:
                    h, w = self._latent_grid(image)
                    rows = b.take(h * w + 2)
                    b.text([s.start_of_image, s.end_of_image], [rows[0], rows[-1]])
                    b.vae_indexes += rows[1:-1]
                    b.latent_pos.append(image_transforms.grid_position_ids(h, w, self.cfg.bagel.max_latent_size))
                    b.vae_images.append(VaeImage(image.vae_pixels, (h, w), segment.target))
                    b.positions += [rope] * len(rows)
                    b.split(len(rows), NOISE if segment.target else FULL)
                    rope += 0 if segment.target else 1
                if segment.as_vit:
                    h, w = self._vit_grid(image)
                    rows = b.take(h * w + 2)
                    b.text([s.start_of_image, s.end_of_image], [rows[0], rows[-1]])
                    b.vit_indexes += rows[1:-1]
                    b.vit_patches.append(image_transforms.patchify_image(image.vit_pixels, self.cfg.vit.patch_size))
                    b.vit_pos.append(image_transforms.grid_position_ids(h, w, self.cfg.bagel.vit_max_num_patch_per_side))
                    b.vit_seqlens.append(h * w)
                    b.positions += [rope] * len(rows)
                    b.split(len(rows), FULL)
                    rope += 1
            if b.length == start:
                raise ValueError(f"{sample.name or 'a sample'} has no segments left to train on")
            b.sample_lens.append(b.length - start)
            b.names.append(sample.name)
        return b.finish(self.cfg)


@dataclass
class _Buffers:
    length: int = 0
    text_ids: list = field(default_factory=list)
    text_indexes: list = field(default_factory=list)
    positions: list = field(default_factory=list)
    vit_patches: list = field(default_factory=list)
    vit_pos: list = field(default_factory=list)
    vit_seqlens: list = field(default_factory=list)
    vit_indexes: list = field(default_factory=list)
    vae_images: list = field(default_factory=list)
    latent_pos: list = field(default_factory=list)
    vae_indexes: list = field(default_factory=list)
    ce_indexes: list = field(default_factory=list)
    ce_labels: list = field(default_factory=list)
    ce_weights: list = field(default_factory=list)
    sample_lens: list = field(default_factory=list)
    split_lens: list = field(default_factory=list)
    split_modes: list = field(default_factory=list)
    names: list = field(default_factory=list)

    def take(self, n: int) -> list[int]:
        rows = list(range(self.length, self.length + n))
        self.length += n
        return rows

    def text(self, ids: list[int], rows: list[int]) -> None:
        self.text_ids += ids
        self.text_indexes += rows

    def split(self, n: int, mode: int) -> None:
        self.split_lens.append(n)
        self.split_modes.append(mode)

    def finish(self, cfg: ModelConfig) -> PackedBatch:
        long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        vit_dim = 3 * cfg.vit.patch_size ** 2
        return PackedBatch(
            length=self.length, text_ids=long(self.text_ids), text_indexes=long(self.text_indexes),
            position_ids=long(self.positions),
            vit_patches=torch.cat(self.vit_patches) if self.vit_patches else torch.zeros(0, vit_dim),
            vit_position_ids=torch.cat(self.vit_pos) if self.vit_pos else long([]),
            vit_seqlens=self.vit_seqlens, vit_indexes=long(self.vit_indexes), vae_images=self.vae_images,
            latent_position_ids=torch.cat(self.latent_pos) if self.latent_pos else long([]),
            vae_indexes=long(self.vae_indexes), ce_indexes=long(self.ce_indexes), ce_labels=long(self.ce_labels),
            sample_lens=self.sample_lens, split_lens=self.split_lens, split_modes=self.split_modes, names=self.names,
            ce_weights=torch.tensor(self.ce_weights, dtype=torch.float32),
        )


def sample_length(packer: SequencePacker, sample: Sample) -> int:
    """Tokens the sample takes when nothing is dropped (for packing to a budget)."""
    packer.check(sample)
    n = 0
    for segment in sample.segments:
        if isinstance(segment, Text):
            n += len(packer.tokenizer.frame(segment.text))
            continue
        if not packer.visual_und and segment.as_vit and not segment.as_vae:
            continue
        image = packer.prepared(segment, sample)
        if segment.target or segment.as_vae:
            h, w = packer._latent_grid(image)
            n += h * w + 2
        if segment.as_vit and packer.visual_und:
            h, w = packer._vit_grid(image)
            n += h * w + 2
    return n
