"""Markdown table of a shapes_quality.sh run: python benchmarks/shapes_table.py benchmarks/results/shapes-quality-DATE.jsonl"""

import json
import sys


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    print("| option | t2i | held-out pairs | edit | vqa | seconds (2 CPU cores) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        s = r["result"]["scores"]
        print(f"| {r['option']} | {s['t2i']['overall']:.3f} | {s['t2i']['held_out']:.3f} | {s['edit']['overall']:.3f} "
              f"| {s['vqa']['overall']:.3f} | {r['seconds']} |")
    n = rows[0]["result"]["params"]["n"] if rows else "?"
    print(f"\n({n} items per category; `bash benchmarks/shapes_quality.sh bagel-shapes {n}`)")


if __name__ == "__main__":
    main(sys.argv[1])
