"""``bagel bench -w train``: training throughput on synthetic packed data.

The trainer (``bagel_engine.train.Trainer``) runs ``warmup`` steps and then ``steps`` timed ones on
a generated dataset (text-to-image rows with synthetic images of the workload's size, and chat
rows), packed to ``max_tokens`` per sequence. Reported: seconds per step, tokens per second, peak
memory, and the model FLOPs utilisation: 3x the forward FLOPs of the sequences (forward plus
backward, the usual convention; recomputation under gradient checkpointing is not counted, nor is
the cheaper backward of frozen weights) over the time, against the measured matmul rate. The VAE
encode runs without gradient and counts once.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bagel_engine.bench import device as device_rates
from bagel_engine.bench import flops as flop_model
from bagel_engine.bench.workloads import synthetic_image


@dataclass
class TrainBench:
    model: str
    random_weights: bool = False
    height: int = 512
    width: int = 512
    max_tokens: int = 4096
    steps: int = 5
    warmup: int = 1
    lora_rank: int = 0
    freeze: tuple[str, ...] = ()
    gradient_checkpointing: bool = False
    device: str | None = None
    dtype: str = "float32"
    matmul_tflops: float | None = None


def _dataset(folder: Path, height: int, width: int, rows: int = 16) -> Path:
    lines = []
    for i in range(rows):
        if i % 4 == 3:
            lines.append({"prompt": f"Tell me a short fact about the number {i}.",
                          "answer": f"The number {i} is written with the digits of {i}; it follows {i - 1}."})
            continue
        name = f"img{i}.png"
        synthetic_image(width, height, seed=i).save(folder / name)
        lines.append({"prompt": f"A synthetic test picture number {i} with soft gradients and shapes.", "image": name})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def _forward_flops(cfg, batch) -> float:
    d = cfg.latent_downsample
    parts = flop_model.training_forward_flops(
        cfg, length=batch.length,
        pairs=flop_model.packed_attention_pairs(batch.sample_lens, batch.split_lens, batch.split_modes),
        vit_images=list(batch.vit_seqlens),
        vae_images=[(im.grid[0] * d, im.grid[1] * d) for im in batch.vae_images],
        latent_tokens=int(batch.vae_indexes.numel()), mse_tokens=batch.mse_tokens, ce_tokens=batch.ce_tokens)
    return 3 * (parts["decoder"] + parts["vit"] + parts["heads"]) + parts["vae_encode"]


def run_training_benchmark(tb: TrainBench, log=lambda s: None) -> dict:
    import torch

    from bagel_engine.train import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        data = _dataset(Path(tmp), tb.height, tb.width)
        cfg = TrainConfig(model=tb.model, data=str(data), output_dir=str(Path(tmp) / "out"), steps=tb.warmup + tb.steps,
                          max_tokens=tb.max_tokens, lora_rank=tb.lora_rank, freeze=tuple(tb.freeze),
                          gradient_checkpointing=tb.gradient_checkpointing, device=tb.device, dtype=tb.dtype,
                          random_weights=tb.random_weights, warmup_steps=0, lr=1e-5, progress=False, resume=False)
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        load_s = time.perf_counter() - t0
        dev = trainer.device
        captured = []
        original = trainer.data.packer.pack

        def pack(samples):  # see each packed sequence (in the order they are trained on) to count its FLOPs
            batch = original(samples)
            captured.append(batch)
            return batch

        trainer.data.packer.pack = pack
        memory = device_rates.PeakMemory(dev)
        memory.reset()
        for _ in range(tb.warmup):
            trainer.train_step()
        seconds, tokens, flops = [], [], []
        for i in range(tb.steps):
            device_rates.synchronize(dev)
            t = time.perf_counter()
            record = trainer.train_step()
            device_rates.synchronize(dev)
            seconds.append(time.perf_counter() - t)
            tokens.append(record["tokens"])
            flops.append(_forward_flops(trainer.pipe.config, captured[tb.warmup + i]))
            log(f"step {i + 1}/{tb.steps}: {seconds[-1]:.3f} s, {record['tokens']} tokens")
        peak = memory.peak_bytes()
        if trainer.batches is not None:
            trainer.batches.close()
        trainable = sum(p.numel() for p in trainer.params.values())
        total_params = sum(p.numel() for p in trainer.model.parameters())
        del trainer
    rate = tb.matmul_tflops
    matmul = None
    if rate is None:
        matmul = device_rates.matmul_rate(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
        rate = matmul["tflops"]
    step_s = statistics.median(seconds)
    achieved = sum(flops) / sum(seconds) / 1e12
    return {
        "workload": "train", "model": tb.model, "random_weights": tb.random_weights,
        "device": device_rates.describe(dev), "dtype": tb.dtype, "image": f"{tb.width}x{tb.height}", "max_tokens": tb.max_tokens,
        "lora_rank": tb.lora_rank, "freeze": list(tb.freeze), "gradient_checkpointing": tb.gradient_checkpointing,
        "params": total_params, "trainable_params": trainable, "load_s": load_s, "step_s": step_s,
        "tokens_per_step": statistics.median(tokens), "tokens_per_s": sum(tokens) / sum(seconds),
        "model_tflop_per_step": statistics.median(flops) / 1e12, "achieved_tflops": achieved,
        "matmul_tflops": rate, "matmul_measured": matmul, "mfu": achieved / rate,
        "peak_bytes": peak, "peak_kind": memory.kind, "steps": tb.steps, "warmup": tb.warmup,
    }


def format_training(r: dict) -> str:
    lines = [
        f"workload     train: packed sequences of <= {r['max_tokens']} tokens, t2i images {r['image']} + chat rows",
        f"model        {r['model']}{' (random weights)' if r['random_weights'] else ''}: "
        f"{r['params'] / 1e6:.1f} M parameters, {r['trainable_params'] / 1e6:.2f} M trained, {r['dtype']}"
        + (f", LoRA rank {r['lora_rank']}" if r["lora_rank"] else "")
        + (f", frozen {','.join(r['freeze'])}" if r["freeze"] else "")
        + (", gradient checkpointing" if r["gradient_checkpointing"] else ""),
        f"device       {device_rates.short_name(r['device'])}",
        f"load         {r['load_s']:.2f} s",
        f"step         {r['step_s'] * 1e3:.1f} ms (median of {r['steps']} after {r['warmup']} warm-up), "
        f"{r['tokens_per_step']:.0f} tokens per step",
        f"throughput   {r['tokens_per_s']:.0f} tokens/s",
        f"model FLOPs  {r['model_tflop_per_step']:.3g} TFLOP per step (3x forward) -> {r['achieved_tflops']:.3g} TFLOP/s",
        f"matmul rate  {r['matmul_tflops']:.4g} TFLOP/s -> MFU {100 * r['mfu']:.1f} %",
        f"peak memory  {r['peak_bytes'] / 1e9:.3g} GB ({r['peak_kind']})",
    ]
    return "\n".join(lines)
