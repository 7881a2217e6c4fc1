"""One ``--compare`` option set, measured in a fresh process: ``python -m bagel_engine.bench.worker
SPEC.json OUT_DIR``.

A fresh process per option set makes its load time and peak memory its own (a process that
already loaded another model keeps freed memory, allocator caches, compiled graphs and pinned
buffers), and an option that crashes or is killed for memory cannot take the benchmark with it.
SPEC holds ``model``, ``load_kwargs``, ``device``, ``dtype``, ``workload`` (``Workload.as_dict()``),
``repeat`` and ``warmup``. OUT_DIR receives ``result.json`` (the figures, or ``{"status": "failed",
"error": ...}``), ``latents.pt`` and ``image-K.png`` / texts of the first measured run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


from bagel_engine.bench.option_files import RESULT, workload_from_dict, write_outputs
from bagel_engine.bench.runner import measure, summarize


def run(spec: dict, out_dir: Path) -> dict:
    m = measure(spec["model"], spec["load_kwargs"], workload_from_dict(spec["workload"]), device=spec["device"],
                dtype=spec["dtype"], repeat=spec["repeat"], warmup=spec["warmup"],
                log=lambda s: print(s, file=sys.stderr, flush=True))
    texts = write_outputs(m.outputs, out_dir)
    return {"status": "ok", "load_s": m.load_s, "peak_bytes": m.peak_bytes, "figures": summarize(m), "texts": texts}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, out_dir = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    try:
        result = run(spec, out_dir)
    except Exception as e:  # noqa: BLE001 - every failure of an option is a result to report
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}".strip()}
    (out_dir / RESULT).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
