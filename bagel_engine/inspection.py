"""What a model directory should hold and what it does hold (``bagel inspect``), without loading weights."""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bagel_engine.model.config import ModelConfig
from bagel_engine.weights.config import checkpoint_config
from bagel_engine.weights.hub import HubOptions, RemoteHeader, describe, list_files, read_header
from bagel_engine.weights.layout import Checkpoint, find_checkpoint
from bagel_engine.weights.loader import (AE_FILE, MODEL_FILE, FileReport, check_file, compare_tensors, expected_tensors,
                                         hub_repo, resolve_model_dir)

BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "nf4": 0.5}


class _HubHeaders:
    """The safetensors headers of a hub repo's files, each read once (a byte range, no weights)."""

    def __init__(self, repo: str, hub: HubOptions) -> None:
        self.repo, self.hub, self._seen = repo, hub, {}

    def __call__(self, name: str) -> RemoteHeader:
        if name not in self._seen:
            self._seen[name] = read_header(self.repo, name, self.hub)
        return self._seen[name]


def _checkpoint(model: str | os.PathLike, weights_file: str | None, base_config: str | None,
                hub: HubOptions | None) -> tuple[Checkpoint, _HubHeaders | None]:
    remote = hub_repo(model, hub)
    model_dir = resolve_model_dir(model, hub, weights=False)
    if remote is None:
        return find_checkpoint(model_dir, weights_file, base_config, need_weights=False, hub=hub), None
    headers = _HubHeaders(*remote)
    files = list_files(*remote) or ()
    ck = find_checkpoint(model_dir, weights_file, base_config, need_weights=False, hub=hub, remote_files=files,
                         remote_metadata=lambda name: headers(name).metadata)
    return ck, headers


def checkpoint_of(model: str | os.PathLike, weights_file: str | None = None, base_config: str | None = None,
                  hub: HubOptions | None = None) -> tuple[Checkpoint, ModelConfig]:
    """The checkpoint's files (any layout of the BAGEL family) and its configuration; no weight is read
    (a hub model: its configs, tokenizer and indexes are downloaded, not its weights)."""
    ck, _ = _checkpoint(model, weights_file, base_config, hub)
    return ck, checkpoint_config(ck)


def inspect_model(model: str | os.PathLike, weights_file: str | None = None,
                  base_config: str | None = None, hub: HubOptions | None = None) -> dict[str, Any]:
    """:func:`inspect_and_config`'s report."""
    return inspect_and_config(model, weights_file, base_config, hub)[0]


def inspect_and_config(model: str | os.PathLike, weights_file: str | None = None, base_config: str | None = None,
                       hub: HubOptions | None = None) -> tuple[dict[str, Any], ModelConfig]:
    """A JSON-ready report: the layout found, the configs as the engine reads them, every expected tensor
    name and shape per file, parameter counts and sizes per dtype, and (where the weight files are present)
    missing, unexpected and wrongly shaped tensors with hints for known mistakes. A hub model's weight files
    are judged by their headers, read over HTTP: nothing but configs, tokenizer and headers is downloaded."""
    ck, headers = _checkpoint(model, weights_file, base_config, hub)
    cfg = checkpoint_config(ck)
    model_dir = ck.model_dir
    expected = expected_tensors(cfg)
    report: dict[str, Any] = {
        "model_dir": str(model_dir),
        "layout": ck.describe(),
        "config": {
            "llm": asdict(cfg.llm),
            "vit": asdict(cfg.vit),
            "vae": asdict(cfg.vae),
            "bagel": asdict(cfg.bagel),
            "derived": {
                "latent_downsample": cfg.latent_downsample,
                "max_image_side": cfg.max_image_side,
                "patch_latent_dim": cfg.patch_latent_dim,
                "llm_head_dim": cfg.llm.head_dim,
                "kv_bytes_per_token_bf16": 2 * 2 * cfg.llm.num_hidden_layers * cfg.llm.num_key_value_heads * cfg.llm.head_dim,
            },
        },
        "expected": {f: {k: list(v) for k, v in shapes.items()} for f, shapes in expected.items()},
        "files": {},
    }
    if headers is not None:
        report["hub"] = describe(headers.repo, headers.hub)
    for fname, shapes in expected.items():
        params = sum(math.prod(s) for s in shapes.values())
        entry: dict[str, Any] = {
            "tensors": len(shapes),
            "parameters": params,
            "bytes": {dt: int(params * b) for dt, b in BYTES_PER_DTYPE.items()},
        }
        paths = list(ck.weights) if fname == MODEL_FILE else [ck.vae] if fname == AE_FILE else [model_dir / fname]
        entry["read_from"] = [str(p) for p in paths]
        on_hub = bool(paths) and headers is not None and all(p.name in ck.remote for p in paths)
        entry["present"] = bool(paths) and (on_hub or all(p.exists() for p in paths))
        if on_hub:
            entry["on_hub"] = True
        if entry["present"]:
            r, size = _remote_report(paths, headers, shapes, cfg) if on_hub else (
                check_file(paths, shapes, cfg), sum(p.stat().st_size for p in paths))
            entry.update(
                ok=r.ok,
                size_bytes=size,
                dtypes=r.dtypes,
                missing=r.missing,
                unexpected=r.unexpected,
                wrong_shape={k: {"expected": list(e), "found": list(g)} for k, (e, g) in r.wrong_shape.items()},
                wrong_dtype=r.wrong_dtype,
                error=r.error,
                hints=r.hints,
            )
        report["files"][fname] = entry
    tok_dir = ck.tokenizer_dir or model_dir
    tok = [n for n in ("tokenizer.json", "vocab.json", "merges.txt") if (tok_dir / n).exists()]
    report["tokenizer_files"] = tok
    report["ok"] = all(e.get("ok", False) for e in report["files"].values()) and bool(tok)
    return report, cfg


def _remote_report(paths: list[Path], headers: _HubHeaders, expected: dict[str, tuple[int, ...]],
                   cfg: ModelConfig) -> tuple[FileReport, int]:
    found, size = {}, 0
    for p in paths:
        header = headers(p.name)
        found.update(header.tensors)
        size += header.data_bytes
    return compare_tensors(found, expected, cfg), size


def format_report(report: dict[str, Any], show_tensors: bool = False) -> str:
    lines = [f"model: {report['model_dir']}", f"layout: {report['layout']}"]
    if report.get("hub"):
        lines.insert(1, f"hub: {report['hub']['repo_id']} at {report['hub']['revision']} "
                        "(configs and tokenizer downloaded; weights judged by their headers)")
    c = report["config"]
    llm, vit, d = c["llm"], c["vit"], c["derived"]
    lines.append(
        f"LLM: {llm['num_hidden_layers']} MoT layers, hidden {llm['hidden_size']}, heads {llm['num_attention_heads']}"
        f"/{llm['num_key_value_heads']} kv, vocab {llm['vocab_size']}"
    )
    lines.append(f"ViT: {vit['num_hidden_layers']} layers used (json says {vit['num_hidden_layers'] + 1}), hidden {vit['hidden_size']}")
    lines.append(
        f"images: up to {d['max_image_side']} px per side, multiples of {d['latent_downsample']}; "
        f"KV cache {d['kv_bytes_per_token_bf16']:,} bytes per token in bf16"
    )
    for fname, e in report["files"].items():
        sizes = ", ".join(f"{dt} {_gb(b)}" for dt, b in e["bytes"].items() if dt in ("float32", "bfloat16"))
        shown = [Path(p).name for p in e.get("read_from", [])]
        label = fname if shown in ([fname], []) else f"{fname} (read from {', '.join(shown)})"
        lines.append(f"{label}: expects {e['tensors']} tensors, {e['parameters']:,} parameters ({sizes})")
        if not e["present"]:
            lines.append("  not present")
            continue
        if e.get("error"):
            lines.append(f"  present: {_gb(e['size_bytes'])}: UNREADABLE")
            lines.append(f"  error: {e['error']}")
            continue
        dts = ", ".join(f"{n} x {k}" for k, n in e["dtypes"].items())
        where = "on the hub, headers read" if e.get("on_hub") else "present"
        lines.append(f"  {where}: {_gb(e['size_bytes'])} ({dts}): {'OK' if e['ok'] else 'MISMATCH'}")
        for k in e["missing"]:
            lines.append(f"  missing: {k}")
        for k in e["unexpected"]:
            lines.append(f"  unexpected: {k}")
        for k, v in e["wrong_shape"].items():
            lines.append(f"  wrong shape: {k}: expected {v['expected']}, found {v['found']}")
        for k, dt in e.get("wrong_dtype", {}).items():
            lines.append(f"  wrong dtype: {k}: stored as {dt}, a floating-point weight is expected")
        for h in e["hints"]:
            lines.append(f"  hint: {h}")
        if show_tensors:
            lines += [f"    {k} {v}" for k, v in report["expected"][fname].items()]
    lines.append(f"tokenizer: {', '.join(report['tokenizer_files']) or 'MISSING'}")
    lines.append("status: OK" if report["ok"] else "status: PROBLEMS (see above)")
    return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
