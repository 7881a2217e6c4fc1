"""What the benchmark needs to know about the device: its name, its measured matmul rate (the
"floor" divides FLOPs by it), a synchronising clock and the peak memory of a run."""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> dict:
    """A short, recordable description of the device (name, kind, cores or memory, torch)."""
    info: dict = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    else:
        info.update(name=cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads())
    return info


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def short_name(info: dict) -> str:
    """``NVIDIA H100 80GB HBM3`` or ``Intel(R) Xeon(R) Processor (2 cores)``."""
    if info.get("type") == "cuda":
        return str(info.get("name"))
    return f"{info.get('name')} ({info.get('cores')} cores)"


def default_matmul_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The rate that bounds the model: bf16 on a GPU, the model's dtype elsewhere (float32 by default)."""
    if device.type == "cuda":
        return torch.bfloat16 if model_dtype == torch.float32 else model_dtype
    return model_dtype


@torch.inference_mode()
def matmul_rate(device: torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = 1.0) -> dict:
    """Measured dense matmul rate: ``size x size`` products timed for about ``seconds``, the best
    of three rounds (the device's attainable peak). Returns ``{"tflops", "dtype", "size"}``. The default size is 8192 on a GPU (large
    enough to reach the tensor cores' steady rate) and 2048 on a CPU."""
    if size is None:
        size = 8192 if device.type == "cuda" else 2048
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    flop = 2.0 * size**3
    for _ in range(2):  # warm-up (library selection, clocks)
        a @ b
    synchronize(device)
    best = 0.0
    for _ in range(3):
        count = 0
        synchronize(device)
        t0 = time.perf_counter()
        while True:
            a @ b
            count += 1
            if count % 4 == 0 or device.type != "cuda":
                synchronize(device)
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds / 3:
                    break
        best = max(best, flop * count / elapsed)
    del a, b
    return {"tflops": best / 1e12, "dtype": str(dtype).removeprefix("torch."), "size": size}


@dataclass
class PeakMemory:
    """Peak memory from :meth:`reset` on: GPU memory allocated by torch on a GPU, the process's
    resident-set high-water mark on a CPU (Linux resets it through /proc/self/clear_refs; where it
    cannot be reset the figure is the process's peak so far and ``resettable`` is False)."""

    device: torch.device
    resettable: bool = True

    @property
    def kind(self) -> str:
        return "cuda max_memory_allocated" if self.device.type == "cuda" else "RSS high-water mark"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.resettable = False

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if platform.system() == "Darwin" else rss * 1024)


class HostContention:
    """Share of the machine's CPU capacity used by *other* processes between :meth:`start` and
    :meth:`stop` (from /proc/stat minus this process's own CPU time): 0 on a quiet machine, 0.5
    when others keep half the cores busy. ``None`` where /proc/stat is unavailable."""

    def __init__(self):
        self._start = None

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / hz  # minus idle and iowait
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy, usage.ru_utime + usage.ru_stime

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        others = (end[1] - self._start[1]) - (end[2] - self._start[2])
        cores = os.cpu_count() or 1
        return max(0.0, others / (wall * cores)) if wall > 0 else None


class StepClock:
    """A denoising callback that timestamps every step without synchronising the host inside the
    loop: CUDA events on a GPU (read after the run), ``perf_counter`` on a CPU. On a GPU it waits
    for the device once, after the last step, so that the API's ``denoise_s`` covers the work.
    One clock can serve several calls: a step 1 starts a new series."""

    def __init__(self, device: torch.device):
        self.device = device
        self.series: list[list] = []

    def __call__(self, step: int, total: int) -> None:
        if step == 1 or not self.series:
            self.series.append([])
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.series[-1].append(event)
            if step == total:
                torch.cuda.synchronize(self.device)
        else:
            self.series[-1].append(time.perf_counter())

    def step_seconds(self) -> list[tuple[int, float]]:
        """``(k, seconds)`` for every timed step: ``k`` is the 0-based step index (from 1 on: the
        first step of a call has no start mark)."""
        out = []
        for marks in self.series:
            for k in range(1, len(marks)):
                a, b = marks[k - 1], marks[k]
                out.append((k, a.elapsed_time(b) / 1000 if self.device.type == "cuda" else b - a))
        return out
