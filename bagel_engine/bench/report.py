"""How a benchmark result is shown: a text report, a markdown table row, a recorded JSON file."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from bagel_engine.bench.device import short_name
from bagel_engine.bench.runner import json_safe

TABLE_HEADER = (
    "| date | device | model | workload | dtype / options | load | prefill | ms/step (guided / plain) "
    "| s/img or tok/s | VAE decode | peak mem | FLOPs | floor | ours / floor | command |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def si(value: float | None, unit: str = "FLOP") -> str:
    if value is None:
        return "-"
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def secs(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1.0:
        return f"{value * 1000:.3g} ms"
    return f"{value:.3g} s"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def options_text(r: dict) -> str:
    opts = [f"{k}={v}" for k, v in (r.get("load_options") or {}).items()]
    return ", ".join([r.get("dtype", "?"), *opts])


def workload_text(r: dict) -> str:
    w = r["workload"]
    kind = w["kind"]
    if kind == "t2i":
        lo, hi = w["cfg_interval"]
        text = f"t2i {w['width']}x{w['height']} {w['num_timesteps']} steps cfg {w['cfg_text_scale']:g}/{w['cfg_img_scale']:g} [{lo:g},{hi:g}]"
    elif kind == "edit":
        lo, hi = w["cfg_interval"]
        text = f"edit {w['width']}x{w['height']} {w['num_timesteps']} steps cfg {w['cfg_text_scale']:g}/{w['cfg_img_scale']:g} [{lo:g},{hi:g}]"
    elif kind == "understand":
        text = f"understand {w['width']}x{w['height']}, {r.get('tokens', 0):.0f} tokens"
    else:
        text = f"chat, {r.get('tokens', 0):.0f} tokens"
    if w.get("enable_taylorseer"):
        text += " TaylorSeer"
    if w.get("batch_size", 1) > 1:
        text += f" batch {w['batch_size']}"
    return text


def format_text(r: dict) -> str:
    """The human-readable report ``bagel bench`` prints."""
    w, fl, floor = r["workload"], r["flops"], r["floor"]
    dev = r["device"]
    lines = [f"workload     {workload_text(r)}"]
    lines.append(f"model        {r['model']}{' (random weights)' if r.get('random_weights') else ''}: "
                 f"{r['params'] / 1e6:,.1f} M parameters, {options_text(r)}")
    lines.append(f"device       {short_name(dev)}, torch {dev.get('torch')}")
    lines.append(f"load         {secs(r['load_s'])}")
    lines.append(f"prefill      {secs(r.get('prefill_s'))}   (floor {secs(floor.get('prefill_s'))})")
    if w["kind"] in ("t2i", "edit"):
        g, p = r.get("ms_per_guided_step"), r.get("ms_per_plain_step")
        detail = f" (guided {_ms(g)} ms, plain {_ms(p)} ms)" if g is not None or p is not None else ""
        lines.append(f"denoise      {secs(r['denoise_s'])} = {r['ms_per_step']:.4g} ms/step{detail}; "
                     f"{fl['steps']} steps, {fl['guided_steps']} guided x {fl['branches_per_guided_step']} branches "
                     f"(floor {floor['ms_per_step']:.4g} ms/step, ours {r['denoise_floor_ratio']:.3g}x)")
        lines.append(f"VAE decode   {secs(r.get('vae_decode_s'))}   (floor {secs(floor.get('vae_decode_s'))})")
        ipc = r.get("images_per_call", 1)
        lines.append(f"per image    {secs(r['s_per_image'])}   ({r['images_per_s']:.3g} images/s"
                     f"{f', {ipc} per call' if ipc > 1 else ''}; median of {r['repeat']} after {r['warmup']} warm-up)")
    else:
        tps, ftps = r.get("tokens_per_s"), r["floor"].get("tokens_per_s")
        lines.append(f"decode       {r['tokens']:.0f} tokens in {secs(r.get('decode_s'))} = "
                     f"{tps:.4g} tokens/s" if tps else f"decode       {r['tokens']:.0f} tokens")
        if ftps:
            lines.append(f"             floor {ftps:.4g} tokens/s ({si(r['decode_bytes_per_token'], 'B')}/token at "
                         f"{r['memory_bandwidth_gbs']:.4g} GB/s); ours {r.get('decode_floor_ratio', 0):.3g}x")
        lines.append(f"per request  {secs(r['s_per_request'])}   (median of {r['repeat']} after {r['warmup']} warm-up)")
    lines.append(f"peak memory  {r['peak_memory_gb']:.3g} GB   ({r['peak_memory_kind']}, load included)")
    parts = [f"{name} {si(fl[key])}" for name, key in (("prefill", "prefill"), ("denoise", "denoise"),
                                                      ("VAE decode", "vae_decode"), ("decode", "decode")) if fl[key]]
    lines.append(f"FLOPs        {si(fl['total'])} per request ({', '.join(parts)})")
    mm = r["matmul"]
    how = f"measured, {mm['dtype']} {mm['size']}^3" if mm.get("measured") else f"given, {mm['dtype']}"
    lines.append(f"matmul rate  {mm['tflops']:.4g} TFLOP/s ({how})")
    lines.append(f"floor        {secs(r['floor_s'])} per request -> ours {r['floor_ratio']:.3g}x the floor")
    busy = r.get("other_processes_cpu")
    if busy is not None and busy > 0.1:
        lines.append(f"note         other processes used {busy:.0%} of the CPU during the benchmark: "
                     "figures are noisy")
    if r.get("compare"):
        lines.append("")
        lines.append(format_compare(r["compare"]))
    return "\n".join(lines)


def _q(row: dict) -> str:
    parts = []
    if "latent_cosine" in row:
        parts.append(f"latent cos {row['latent_cosine']:.6f}")
    if "psnr_db" in row:
        v = row["psnr_db"]
        parts.append("PSNR inf (identical)" if v in ("inf", float("inf")) else f"PSNR {v:.2f} dB")
    if "text_exact" in row:
        parts.append(f"same text {row['text_exact']:.0%}, shared prefix {row['text_prefix']:.0%}")
    return ", ".join(parts)


def format_compare(rows: list[dict]) -> str:
    width = max(len(r["options"]) for r in rows)
    out = [f"{'options':<{width}}  {'load':>8}  {'s/request':>10}  {'speedup':>7}  {'peak mem':>9}  quality"]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"{r['options']:<{width}}  failed: {r.get('error', '')}")
            continue
        out.append(f"{r['options']:<{width}}  {secs(r['load_s']):>8}  {secs(r['s_per_request']):>10}  "
                   f"{r['speedup']:>6.2f}x  {r['peak_memory_gb']:>6.3g} GB  {_q(r)}")
    return "\n".join(out)


def markdown_row(r: dict) -> str:
    if r["workload"]["kind"] in ("t2i", "edit"):
        step = f"{r['ms_per_step']:.4g} ({_ms(r.get('ms_per_guided_step'))} / {_ms(r.get('ms_per_plain_step'))})"
        speed = f"{r['s_per_image']:.4g} s/img"
        vae = secs(r.get("vae_decode_s"))
    else:
        step, vae = "-", "-"
        speed = f"{r['tokens_per_s']:.4g} tok/s" if r.get("tokens_per_s") else "-"
    cells = [r["date"], short_name(r["device"]), f"`{r['model']}`" + (" (random)" if r.get("random_weights") else ""),
             workload_text(r), options_text(r), secs(r["load_s"]), secs(r.get("prefill_s")), step, speed, vae,
             f"{r['peak_memory_gb']:.3g} GB", si(r["flops"]["total"]), secs(r["floor_s"]),
             f"{r['floor_ratio']:.3g}x", f"`{r['command']}`"]
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |\n"


def compare_markdown(r: dict) -> str:
    rows = r.get("compare") or []
    if not rows:
        return ""
    out = ["| options | load | s/request | speedup | peak mem | latent cosine | PSNR | status |",
           "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("status") != "ok":
            out.append(f"| {row['options']} | - | - | - | - | - | - | failed: {_short(row.get('error', ''))} |")
            continue
        cos = f"{row['latent_cosine']:.6f}" if "latent_cosine" in row else "-"
        p = row.get("psnr_db")
        ps = "-" if p is None else ("inf" if p in ("inf", float("inf")) else f"{p:.2f} dB")
        out.append(f"| {row['options']} | {secs(row['load_s'])} | {secs(row['s_per_request'])} | {row['speedup']:.2f}x "
                   f"| {row['peak_memory_gb']:.3g} GB | {cos} | {ps} | ok |")
    return "\n".join(out) + "\n"


def _short(error: str, limit: int = 200) -> str:
    """The first clause of an error message, for a table cell."""
    text = (error.splitlines() or [""])[0].split("; ")[0].replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def record(r: dict, directory: Path) -> tuple[Path, Path]:
    """Write ``directory/results/<date>-<workload>-<model>-<device>-<time>.json`` and append a row
    (and the comparison table, if any) to ``directory/RESULTS.md``."""
    directory = Path(directory)
    (directory / "results").mkdir(parents=True, exist_ok=True)
    model = "-".join(Path(r["model"]).parts[-2:]) if Path(r["model"]).name == "model" else Path(r["model"]).name
    name = "-".join([r["date"], r["workload"]["kind"], _slug(model or r["model"]),
                     _slug(short_name(r["device"])), time.strftime("%H%M%S")])
    path = directory / "results" / f"{name}.json"
    k = 1
    while path.exists():
        k += 1
        path = path.with_name(f"{name}-{k}.json")
    path.write_text(json.dumps(json_safe(r), indent=2) + "\n", encoding="utf-8")
    table = directory / "RESULTS.md"
    if not table.exists():
        table.write_text("# Benchmark results\n\nOne row per `bagel bench --record` run; the JSON files in "
                         "`results/` hold every figure.\n\n" + TABLE_HEADER, encoding="utf-8")
    with open(table, "a", encoding="utf-8") as f:
        f.write(markdown_row(r))
    if r.get("compare"):
        with open(directory / "COMPARE.md", "a", encoding="utf-8") as f:
            f.write(f"\n### {r['date']} · {short_name(r['device'])} · `{r['model']}` · {workload_text(r)}\n\n"
                    f"`{r['command']}`\n\n" + compare_markdown(r))
    return path, table


def load_result(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
