"""Run a workload on a loaded pipeline and turn the timings into figures: load time, prefill,
ms per denoising step, seconds per image, VAE decode, text tokens/s, peak memory, the workload's
FLOPs and its floor on this device (a roofline: FLOPs over the measured matmul rate, and for
one-token text decoding the weight and KV bytes over the measured memory bandwidth).

Only the public API is used: ``bagel_engine.load`` and the pipeline's task methods, whose outputs
carry the phase ``timings``; ``pipe.config`` feeds the FLOP model and ``pipe.model`` is read only
to count parameters.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bagel_engine.bench import flops as flop_model
from bagel_engine.bench import quality
from bagel_engine.bench.device import (HostContention, PeakMemory, StepClock, default_matmul_dtype, describe,
                                       matmul_rate, synchronize)
from bagel_engine.bench.workloads import IMAGE_KINDS, Workload
from bagel_engine.params import IMAGE_PARAM_NAMES

RESULT_VERSION = 1
GB = 1e9


@dataclass
class BenchConfig:
    """Everything ``bagel bench`` was asked to do."""

    model: str
    workload: Workload = field(default_factory=Workload)
    random_weights: bool = False
    device: str | None = None
    dtype: str | None = None
    load_options: dict[str, Any] = field(default_factory=dict)  # quantize / offload / compile / attention ...
    repeat: int = 1
    warmup: int = 1
    compare: list[str] = field(default_factory=list)  # option sets, e.g. "quantize=int8" or "offload=layer,compile=true"
    matmul_tflops: float | None = None  # instead of measuring (e.g. a datasheet figure)
    bandwidth_gbs: float | None = None
    matmul_size: int | None = None
    command: str = ""
    date: str | None = None

    def load_kwargs(self) -> dict[str, Any]:
        kw = dict(self.load_options)
        if self.random_weights:
            kw["random_weights"] = True
        return kw


# ----------------------------------------------------------------------------- option sets


def parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null", ""):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_option_set(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``"quantize=int8,compile=true"`` -> (load options, call options). Keys that are image knobs
    (``enable_taylorseer``, ``num_timesteps`` ...) go to the pipeline call, the rest to ``load``."""
    load_kw: dict[str, Any] = {}
    call_kw: dict[str, Any] = {}
    parts = [p for chunk in text.split(",") for p in chunk.split()]
    if not parts:
        raise ValueError("empty option set")
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"option {part!r} is not KEY=VALUE")
        if key in ("cfg_parallel_size", "tensor_parallel_size", "vae_patch_parallel_size"):
            raise ValueError(f"{key}: bagel bench times one process; time a model over several processes with "
                             "torchrun ... bagel generate --json (its timings)")
        (call_kw if key in IMAGE_PARAM_NAMES else load_kw)[key] = parse_value(value)
    return load_kw, call_kw


def with_call_options(workload: Workload, call_kw: dict[str, Any]) -> Workload:
    names = {f.name for f in dataclasses.fields(Workload)}
    direct = {k: v for k, v in call_kw.items() if k in names}
    extra = {k: v for k, v in call_kw.items() if k not in names}
    if isinstance(direct.get("cfg_interval"), str):
        direct["cfg_interval"] = tuple(float(x) for x in direct["cfg_interval"].replace(":", " ").split())
    return dataclasses.replace(workload, **direct, extra={**workload.extra, **extra})


# ----------------------------------------------------------------------------- measuring


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _resolve_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Measurement:
    """One pipeline loaded with one set of options and the workload run on it."""

    load_s: float
    device: torch.device
    dtype: torch.dtype
    config: Any  # ModelConfig
    workload: Workload  # resolved
    params: int
    param_bytes: int
    runs: list[dict]
    outputs: list  # outputs of the first measured run (for quality comparisons)
    peak_bytes: int
    peak_kind: str
    step_seconds: list[tuple[int, float]]


def _prewarm(device: torch.device) -> None:
    """Pay the process's one-time costs before the load is timed: torch's lazy imports of the meta
    kernels (about a second on first use) and, on a GPU, the CUDA context."""
    torch.empty(1, device="meta").normal_()
    if device.type == "cuda":
        torch.empty(1, device=device)
        synchronize(device)


def _count_params(model) -> tuple[int, int]:
    count = size = 0
    for p in model.parameters():
        count += p.numel()
        try:
            size += p.numel() * p.element_size()
        except Exception:  # quantized tensor subclasses
            pass
    return count, size


def _run_once(pipe, workload: Workload, device: torch.device, clock: StepClock | None) -> tuple[list, dict]:
    synchronize(device)
    t0 = time.perf_counter()
    outputs, calls = workload.run(pipe, callback=clock)
    synchronize(device)
    wall = time.perf_counter() - t0
    n = len(outputs)

    def mean(key):
        values = [o.timings.get(key) for o in outputs if o.timings.get(key) is not None]
        return sum(values) / len(values) if values else None

    record = {"wall_s": wall, "calls": calls, "requests": n, "s_per_request": wall / n,
              "prefill_s": mean("prefill_s"), "vae_decode_s": mean("vae_decode_s"), "decode_s": mean("decode_s"),
              "tokens": mean("tokens"), "think_s": mean("think_s"), "total_s": mean("total_s")}
    if workload.kind in IMAGE_KINDS:
        # One batched call shares one denoise_s; separate calls each have their own.
        per_call = [o.timings.get("denoise_s") for o in outputs]
        per_call = per_call[:1] if calls == 1 else per_call
        record["denoise_s"] = sum(v for v in per_call if v is not None) / max(len(per_call), 1)
    return outputs, record


def measure(model: str, load_kwargs: dict[str, Any], workload: Workload, *, device: str | None, dtype: str | None,
            repeat: int, warmup: int, log: Callable[[str], None] = lambda s: None) -> Measurement:
    """Load, warm up, run ``repeat`` times; the peak memory covers the load and every run."""
    import bagel_engine

    target = _resolve_device(device)
    _prewarm(target)
    peak = PeakMemory(target)
    gc.collect()
    if target.type == "cuda":
        torch.cuda.empty_cache()
    peak.reset()
    t0 = time.perf_counter()
    pipe = bagel_engine.load(model, device=device, dtype=dtype, **load_kwargs)
    synchronize(pipe.device)
    load_s = time.perf_counter() - t0
    params, param_bytes = _count_params(pipe.model)
    work = workload.resolved(pipe.config)
    log(f"loaded in {load_s:.2f} s; {work.describe()}")
    for i in range(warmup):
        t = time.perf_counter()
        work.run(pipe)
        synchronize(pipe.device)
        log(f"warm-up {i + 1}/{warmup}: {time.perf_counter() - t:.2f} s")
    runs, first, clock = [], None, StepClock(pipe.device)
    for i in range(repeat):
        outputs, record = _run_once(pipe, work, pipe.device, clock if work.kind in IMAGE_KINDS else None)
        runs.append(record)
        first = first if first is not None else outputs
        log(f"run {i + 1}/{repeat}: {record['wall_s']:.2f} s")
    m = Measurement(load_s=load_s, device=pipe.device, dtype=pipe.dtype, config=pipe.config, workload=work,
                    params=params, param_bytes=param_bytes, runs=runs, outputs=first, peak_bytes=peak.peak_bytes(),
                    peak_kind=peak.kind + ("" if peak.resettable else " (process peak, not resettable)"),
                    step_seconds=clock.step_seconds())
    del pipe
    gc.collect()
    if target.type == "cuda":
        torch.cuda.empty_cache()
    return m


# ----------------------------------------------------------------------------- floors


@torch.inference_mode()
def memory_bandwidth(device: torch.device, size_bytes: int | None = None, seconds: float = 0.3) -> float:
    """Measured copy bandwidth in GB/s (bytes read + bytes written per second), best of three."""
    if size_bytes is None:
        size_bytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best = 0.0
    for _ in range(3):
        count, t0 = 0, time.perf_counter()
        while True:
            dst.copy_(src)
            count += 1
            synchronize(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds / 3:
                break
        best = max(best, 2 * size_bytes * count / elapsed)
    del src, dst
    return best / GB


def decode_bytes_per_token(cfg, context_len: int, new_tokens: int, itemsize: int) -> float:
    """Bytes one text-decoding step must read: the understanding expert's decoder weights, the LM
    head and, on average, the KV cache (unquantized, in the model's dtype)."""
    llm = cfg.llm
    d, hd = llm.hidden_size, llm.head_dim
    q, kv = llm.num_attention_heads * hd, llm.num_key_value_heads * hd
    weights = (d * q + 2 * d * kv + q * d + 3 * d * llm.intermediate_size) * llm.num_hidden_layers + d * llm.vocab_size
    mean_keys = context_len + (new_tokens + 2) / 2
    kv_bytes = 2 * llm.num_hidden_layers * kv * mean_keys
    return float((weights + kv_bytes) * itemsize)


def floors(flops: flop_model.FlopCount, rate_tflops: float, bandwidth_gbs: float | None, decode_bytes: float) -> dict:
    """Seconds each phase of one request needs at least on this device (roofline)."""
    rate = rate_tflops * 1e12
    out = {"prefill_s": flops.prefill / rate, "denoise_s": flops.denoise / rate, "vae_decode_s": flops.vae_decode / rate}
    decode = flops.decode / rate
    if flops.decode_forwards and bandwidth_gbs:
        decode = max(decode, flops.decode_forwards * decode_bytes / (bandwidth_gbs * GB))
    out["decode_s"] = decode
    out["total_s"] = sum(out.values())
    if flops.steps:
        out["ms_per_step"] = 1000 * out["denoise_s"] / flops.steps
    if flops.decode_forwards:
        out["tokens_per_s"] = flops.decode_forwards / decode if decode else None
    return out


# ----------------------------------------------------------------------------- the whole benchmark


def summarize(m: Measurement) -> dict:
    """The figures of one measurement (medians over the measured runs), per request."""
    work = m.workload
    runs = m.runs
    med = {k: _median([r.get(k) for r in runs]) for k in
           ("wall_s", "s_per_request", "prefill_s", "denoise_s", "vae_decode_s", "decode_s", "tokens", "think_s", "total_s")}
    out: dict[str, Any] = {
        "load_s": m.load_s,
        "prefill_s": med["prefill_s"],
        "s_per_request": med["s_per_request"],
        "peak_memory_bytes": m.peak_bytes,
        "peak_memory_gb": m.peak_bytes / GB,
        "peak_memory_kind": m.peak_kind,
    }
    if med["think_s"] is not None:
        out["think_s"] = med["think_s"]
    if work.kind in IMAGE_KINDS:
        steps = work.num_timesteps - 1
        guided = flop_model.guided_steps(work.num_timesteps, work.timestep_shift, work.cfg_interval, work.cfg_text_scale)
        g = [s for k, s in m.step_seconds if guided[k]]
        p = [s for k, s in m.step_seconds if not guided[k]]
        out.update(
            s_per_image=med["s_per_request"],
            images_per_s=1.0 / med["s_per_request"],
            denoise_s=med["denoise_s"],
            ms_per_step=1000 * med["denoise_s"] / steps,
            ms_per_guided_step=1000 * statistics.median(g) if g else None,
            ms_per_plain_step=1000 * statistics.median(p) if p else None,
            vae_decode_s=med["vae_decode_s"],
            images_per_call=runs[0]["requests"] // max(runs[0]["calls"], 1),
        )
    else:
        tokens = med["tokens"] or 0
        out.update(decode_s=med["decode_s"], tokens=tokens,
                   tokens_per_s=tokens / med["decode_s"] if med["decode_s"] else None)
    return out


def run_benchmark(bc: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Measure ``bc.workload`` and, with ``bc.compare``, every option set against it."""
    load_kwargs = bc.load_kwargs()
    contention = HostContention()
    contention.start()
    m = measure(bc.model, load_kwargs, bc.workload, device=bc.device, dtype=bc.dtype, repeat=bc.repeat,
                warmup=bc.warmup, log=log)
    work, cfg = m.workload, m.config
    figures = summarize(m)
    tokens = int(round(figures.get("tokens") or 0)) if work.kind not in IMAGE_KINDS else None
    fl = work.flops(cfg, new_tokens=tokens)

    mm_dtype = default_matmul_dtype(m.device, m.dtype)
    if bc.matmul_tflops is not None:
        rate = {"tflops": float(bc.matmul_tflops), "dtype": str(mm_dtype).removeprefix("torch."), "size": None,
                "measured": False}
    else:
        log("measuring the matmul rate ...")
        rate = {**matmul_rate(m.device, mm_dtype, bc.matmul_size), "measured": True}
    bw = None
    if work.kind not in IMAGE_KINDS:
        bw = bc.bandwidth_gbs if bc.bandwidth_gbs is not None else memory_bandwidth(m.device)
    itemsize = torch.empty((), dtype=m.dtype).element_size()
    dec_bytes = decode_bytes_per_token(cfg, fl.context_tokens, tokens or 0, itemsize) if tokens is not None else 0.0
    floor = floors(fl, rate["tflops"], bw, dec_bytes)
    per_request = figures["s_per_request"]

    result: dict[str, Any] = {
        "version": RESULT_VERSION,
        "date": bc.date or time.strftime("%Y-%m-%d"),
        "command": bc.command,
        "device": describe(m.device),
        "model": bc.model,
        "random_weights": bc.random_weights,
        "load_options": {k: v for k, v in bc.load_options.items()},
        "dtype": str(m.dtype).removeprefix("torch."),
        "params": m.params,
        "param_bytes": m.param_bytes,
        "workload": work.as_dict(),
        "repeat": bc.repeat,
        "warmup": bc.warmup,
        **figures,
        "flops": fl.as_dict(),
        "matmul": rate,
        "floor": floor,
        "floor_s": floor["total_s"],
        "floor_ratio": per_request / floor["total_s"] if floor["total_s"] else None,
    }
    busy = contention.stop()
    if busy is not None:
        # Other processes competing for the CPU make CPU figures noisy (and GPU ones, through the host).
        result["other_processes_cpu"] = busy
    if work.kind in IMAGE_KINDS:
        result["denoise_floor_ratio"] = figures["denoise_s"] / (floor["denoise_s"] * figures["images_per_call"]) \
            if floor["denoise_s"] else None
        result["achieved_tflops"] = fl.total / per_request / 1e12
    else:
        result["memory_bandwidth_gbs"] = bw
        result["decode_bytes_per_token"] = dec_bytes
        if figures.get("tokens_per_s") and floor.get("tokens_per_s"):
            result["decode_floor_ratio"] = floor["tokens_per_s"] / figures["tokens_per_s"]
    if bc.compare:
        result["compare"] = compare(bc, m, figures, log)
    return result


def compare(bc: BenchConfig, base: Measurement, base_figures: dict, log: Callable[[str], None]) -> list[dict]:
    """The baseline and every option set: seconds per request, peak memory and how far the result
    moves (same seeds and prompts). Each set runs in a fresh process (``bench.worker``), so that its
    load time and peak memory are its own; a set that fails to load or run, or whose process dies,
    is reported as failed, never raised."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the device to the option sets' processes
    rows = [{"options": "baseline", "status": "ok", "load_s": base.load_s,
             "s_per_request": base_figures["s_per_request"], "peak_memory_gb": base.peak_bytes / GB,
             "speedup": 1.0, **quality.compare_outputs(base.outputs, base.outputs)}]
    for text in bc.compare:
        row: dict[str, Any] = {"options": text}
        try:
            load_kw, call_kw = parse_option_set(text)
            row.update(load_options=load_kw, call_options=call_kw)
            work = with_call_options(base.workload, call_kw)
            kw = {**bc.load_kwargs(), **load_kw}
            device, dtype = kw.pop("device", bc.device), kw.pop("dtype", bc.dtype)
            log(f"compare: {text}")
            result, outputs = _measure_in_subprocess(
                {"model": bc.model, "load_kwargs": kw, "device": device, "dtype": dtype,
                 "workload": work.as_dict(), "repeat": bc.repeat, "warmup": bc.warmup}, log)
            if result.get("status") != "ok":
                raise _OptionFailed(result.get("error") or "failed")
            fig = result["figures"]
            row.update(status="ok", load_s=result["load_s"], s_per_request=fig["s_per_request"],
                       peak_memory_gb=result["peak_bytes"] / GB,
                       speedup=base_figures["s_per_request"] / fig["s_per_request"],
                       **quality.compare_outputs(base.outputs, outputs))
            for key in ("ms_per_step", "tokens_per_s"):
                if fig.get(key) is not None:
                    row[key] = fig[key]
        except _OptionFailed as e:
            row.update(status="failed", error=str(e))
        except Exception as e:  # noqa: BLE001 - any failure of an option is a result to report
            row.update(status="failed", error=f"{type(e).__name__}: {e}".strip())
        if row["status"] != "ok":
            log(f"compare: {text} failed: {row['error']}")
        rows.append(row)
    return rows


class _OptionFailed(Exception):
    pass


def _measure_in_subprocess(spec: dict, log: Callable[[str], None]) -> tuple[dict, list]:
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from bagel_engine.bench import option_files

    with tempfile.TemporaryDirectory(prefix="bagel-bench-") as tmp:
        out = Path(tmp)
        (out / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", "bagel_engine.bench.worker", str(out / "spec.json"), str(out)],
                              capture_output=True, text=True)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        for line in lines:
            log(f"  {line}")
        if not (out / option_files.RESULT).exists():
            tail = " / ".join(lines[-3:])
            raise _OptionFailed(f"the process exited with status {proc.returncode} (killed for memory?)"
                                + (f": {tail}" if tail else ""))
        result = json.loads((out / option_files.RESULT).read_text(encoding="utf-8"))
        return result, (option_files.read_outputs(out, result) if result.get("status") == "ok" else [])


def json_safe(value: Any) -> Any:
    """Infinite floats (identical images have an infinite PSNR) as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else None)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value
