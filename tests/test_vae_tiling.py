"""Tiled VAE encode / decode (runtime/vae_tiling.py): exact for a position-wise map, the tiles cover every
sample, and on the demo model's autoencoder close to the untiled result within the bound docs/memory.md states."""

from __future__ import annotations

import random

import pytest
import torch

import bagel_engine
from bagel_engine.runtime import image_transforms
from bagel_engine.runtime.vae_tiling import Tiling, decode_tiled, encode_tiled
from bagel_engine.shapes import world


def test_tiles_cover_the_latent_with_full_sized_tiles():
    t = Tiling(tile=8, overlap=2)
    assert t.starts(8) == [0] and t.starts(20) == [0, 6, 12] and t.starts(9) == [0, 1]
    boxes = t.split(20, 9)
    covered = torch.zeros(20, 9)
    for y0, y1, x0, x1 in boxes:
        assert (y1 - y0, x1 - x0) == (8, 8)
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1 and not t.needed(8, 8) and t.needed(9, 8)
    with pytest.raises(ValueError):
        Tiling(tile=4, overlap=4)


def test_a_position_wise_map_is_reproduced_exactly():
    """Where a tile's output does not depend on its neighbours, blending changes nothing (up to rounding)."""
    z = torch.randn(2, 4, 21, 13)

    def decode(x):  # each latent position -> a 4x4 block of pixels
        return torch.tanh(x[:, :3]).repeat_interleave(4, -1).repeat_interleave(4, -2) * 0.5

    def encode(px):  # each 4x4 block -> one latent position
        return torch.nn.functional.avg_pool2d(px, 4)

    tiling = Tiling(tile=6, overlap=2)
    torch.testing.assert_close(decode_tiled(decode, z, tiling, 4), decode(z), rtol=1e-6, atol=1e-6)
    px = torch.randn(1, 3, 84, 52)
    torch.testing.assert_close(encode_tiled(encode, px, tiling, 4, 3), encode(px), rtol=1e-6, atol=1e-6)
    small = torch.randn(1, 4, 5, 5)
    assert torch.equal(decode_tiled(decode, small, tiling, 4), decode(small))  # one tile: untiled


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4.0 / ((a - b) ** 2).mean()))  # images in [-1, 1]: peak-to-peak 2


def test_on_the_demo_autoencoder_tiling_stays_close_to_the_untiled_result():
    """A 128x128 picture (32x32 latent) in tiles of 16 latent positions (64 px, the size the autoencoder was
    trained at), overlapping by 4: the stated bound is >= 27 dB PSNR against the untiled decode. The gap is
    the tiles' own GroupNorm statistics and mid-block attention, which the untiled decode takes over the whole
    picture; the fake tiling below (tiles of 4) must score worse, so the check can fail."""
    pipe = bagel_engine.load("bagel-shapes", device="cpu")
    vae = pipe.engine.vae
    rng = random.Random(3)
    placer, objs = world.Placer(rng, 128), []
    for color, shape in (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("orange", "circle")):
        o = placer.place(color, shape, objs)
        if o is not None:
            objs.append(o)
    x = image_transforms.image_to_tensor(world.draw(objs, 128))[None]
    with torch.no_grad():
        z = vae.latent_from_moments(vae.encode_moments(x))
        full = vae.decode(z)
        tiled = decode_tiled(vae.decode, z, Tiling(16, 4), vae.downsample)
        coarse = decode_tiled(vae.decode, z, Tiling(4, 1), vae.downsample)
        z_tiled = vae.latent_from_moments(encode_tiled(vae.encode_moments, x, Tiling(16, 4), vae.downsample, 2 * vae.cfg.z_channels))
    assert tiled.shape == full.shape == x.shape
    assert psnr(tiled, full) >= 27.0 > psnr(coarse, full) + 5
    assert float((z_tiled - z).norm() / z.norm()) < 0.3


def test_the_pipeline_tiles_when_asked():
    pipe = bagel_engine.load("bagel-shapes", device="cpu", vae_tiling=True)
    assert pipe.engine.vae_tiling == Tiling()
    pipe.enable_vae_tiling(tile=8, overlap=2)  # 32 px tiles: a 64x64 picture is drawn in 9 tiles
    calls = []
    decode = pipe.engine.vae.decode
    pipe.engine.vae.decode = lambda z: calls.append(tuple(z.shape[-2:])) or decode(z)
    out = pipe.generate("a red circle", seed=1, num_timesteps=3)
    assert out.image.size == (64, 64) and calls == [(8, 8)] * 9
    pipe.disable_vae_tiling()
    calls.clear()
    pipe.generate("a red circle", seed=1, num_timesteps=3)
    assert calls == [(16, 16)]


def _patch_parallel_rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    z = torch.randn(1, 8, 20, 28)
    vae = bagel_engine.load("bagel-shapes", device="cpu").engine.vae
    with torch.no_grad():
        image = decode_tiled(vae.decode, z, Tiling(8, 2), vae.downsample, group=dist.group.WORLD)
    torch.save(image, f"{out}.{rank}")
    dist.destroy_process_group()


def test_patch_parallel_over_two_processes_equals_one_process_tiling(tmp_path):
    """VAE patch parallel: two gloo processes decode a share of the tiles each; both get the one-process
    tiled picture (within float rounding: the sums are added in another order)."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "image")
    mp.spawn(_patch_parallel_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2)
    torch.manual_seed(0)
    z = torch.randn(1, 8, 20, 28)
    vae = bagel_engine.load("bagel-shapes", device="cpu").engine.vae
    with torch.no_grad():
        alone = decode_tiled(vae.decode, z, Tiling(8, 2), vae.downsample)
    assert len(Tiling(8, 2).split(20, 28)) == 15  # an odd count: the ranks hold 8 and 7 tiles
    for rank in range(2):
        torch.testing.assert_close(torch.load(f"{out}.{rank}"), alone, rtol=1e-5, atol=1e-5)
