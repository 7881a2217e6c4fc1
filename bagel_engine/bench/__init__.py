"""``bagel bench``: timed workloads on the public API, a FLOP model of BAGEL, the device's floor,
peak memory, and quality comparisons between loading options.

    from bagel_engine.bench import BenchConfig, Workload, run_benchmark
    result = run_benchmark(BenchConfig("tests/data/tiny-v1/model", Workload("t2i", height=64, width=64)))
"""

from bagel_engine.bench.flops import FlopCount, guided_steps
from bagel_engine.bench.runner import BenchConfig, parse_option_set, run_benchmark
from bagel_engine.bench.workloads import KINDS, Workload

__all__ = ["BenchConfig", "FlopCount", "KINDS", "Workload", "guided_steps", "parse_option_set", "run_benchmark"]
