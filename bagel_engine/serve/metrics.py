"""Prometheus metrics in the text exposition format, kept by hand (no extra dependency)."""

from __future__ import annotations

import math
import os
import threading
import time
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in pairs) + "}"


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1


class Metrics:
    """Counters, gauges and histograms with labels. Thread-safe; render() gives Prometheus text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self._hists: dict[str, dict[tuple, _Histogram]] = defaultdict(dict)
        self._help: dict[str, tuple[str, str]] = {}
        self._gauges: dict[str, tuple[str, object]] = {}
        self.started = time.time()
        for name, help_ in (
            ("bagel_requests_total", "HTTP requests answered, by endpoint and status code."),
            ("bagel_requests_rejected_total", "Requests refused with 429 because the queue was full."),
            ("bagel_jobs_total", "Model jobs finished, by kind and outcome (ok, bad_input, error, cancelled)."),
            ("bagel_images_generated_total", "Images produced by the model."),
        ):
            self._help[name] = ("counter", help_)
        for name, help_ in (
            ("bagel_request_duration_seconds", "Time from request arrival to response, by endpoint."),
            ("bagel_job_duration_seconds", "Time the model worker spent on a job, by kind."),
            ("bagel_queue_wait_seconds", "Time a job waited in the queue before the worker took it."),
        ):
            self._help[name] = ("histogram", help_)

    # -- updates -----------------------------------------------------------------------------
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._counters[name][key] += amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            h = self._hists[name].get(key)
            if h is None:
                h = self._hists[name][key] = _Histogram(LATENCY_BUCKETS)
            h.observe(value)

    def gauge(self, name: str, help_: str, fn) -> None:
        """Register a gauge whose value ``fn()`` gives at scrape time."""
        self._gauges[name] = (help_, fn)

    def counter_value(self, name: str, **labels: str) -> float:
        key = tuple(sorted(labels.items()))
        with self._lock:
            return self._counters.get(name, {}).get(key, 0.0)

    # -- exposition ----------------------------------------------------------------------------
    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, help_) in self._help.items():
                lines.append(f"# HELP {name} {help_}")
                lines.append(f"# TYPE {name} {kind}")
                if kind == "counter":
                    for key, v in sorted(self._counters.get(name, {}).items()):
                        lines.append(f"{name}{_labels(key)} {_fmt(v)}")
                else:
                    for key, h in sorted(self._hists.get(name, {}).items()):
                        for b, c in zip(h.buckets, h.counts):
                            lines.append(f"{name}_bucket{_labels(key + (('le', _fmt(b)),))} {c}")
                        lines.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {h.count}")
                        lines.append(f"{name}_sum{_labels(key)} {_fmt(h.sum)}")
                        lines.append(f"{name}_count{_labels(key)} {h.count}")
        for name, (help_, fn) in self._gauges.items():
            try:
                value = float(fn())
            except Exception:  # a gauge must never break the scrape
                continue
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} gauge")
            lines.append(f"{name} {_fmt(value)}")
        lines.append("# HELP process_resident_memory_bytes Resident memory size in bytes.")
        lines.append("# TYPE process_resident_memory_bytes gauge")
        lines.append(f"process_resident_memory_bytes {resident_memory_bytes()}")
        lines.append("# HELP process_start_time_seconds Start time of the server since the epoch.")
        lines.append("# TYPE process_start_time_seconds gauge")
        lines.append(f"process_start_time_seconds {_fmt(round(self.started, 3))}")
        return "\n".join(lines) + "\n"


def resident_memory_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        try:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        except Exception:
            return 0
