"""GEdit-Bench's VIEScore judging as the official scripts do it (``eval/gen/gedit/test_gedit_score.py``, its
``viescore`` package and ``calculate_statistics.py``), through any OpenAI-compatible judge (``bagel_engine.eval.judge``).

The prompts are read from the user's own copy of VIEScore's ``vie_prompts.py`` (module-level strings, parsed, never
run; nothing of it is shipped here): for an edit ("tie"), semantic consistency asks ``_context_no_delimit``,
``_prompts_0shot_two_image_edit_rule`` and ``_prompts_0shot_tie_rule_SC`` (joined by newlines, ``<instruction>``
replaced) with the source picture and the edit, perceptual quality asks ``_context_no_delimit`` and
``_prompts_0shot_rule_PQ`` with the edit alone; the edit is resized to the source's size and both are sent as JPEG,
as the scripts do, at most 1,400 tokens. A verdict's scores are the JSON ``score`` list between VIEScore's
delimiters (or the first ``{...}``, or a bare ``[a, b]`` list, or a bare number 0-10); SC and PQ are the minimum of
their lists, O = sqrt(SC x PQ). A verdict without a readable list is asked once more, as VIEScore does; where the
official code then guesses a random score, the item is reported here (``unparsed``) and left out.

Records go to ``RESULTS/bagel_{group}_gpt_score.csv`` (the script's columns: source_image, edited_image, instruction,
sementics_score [sic], quality_score, intersection_exist, instruction_language) and ``bagel_combined_gpt_score.csv``,
so ``calculate_statistics.py`` runs on them unchanged (RESULTS: ``PARENT/gpt4o/eval_results_new`` for edits in
``PARENT/gen_image/fullset``, as ``run_gedit.sh`` lays them out). ``calculate_statistics.py``'s arithmetic per language:
the mean SC, PQ and O of each of the 11 task groups, then the mean of the groups; the same over the rows whose
``Intersection_exist`` is true.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bagel_engine.eval.common import parse_python
from bagel_engine.eval.judge import Judge, JudgeCapReached, JudgeError
from bagel_engine.params import BagelInputError

log = logging.getLogger(__name__)

GROUPS = ("background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
          "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer")
CSV_COLUMNS = ("source_image", "edited_image", "instruction", "sementics_score", "quality_score", "intersection_exist",
               "instruction_language")
PROMPT_NAMES = ("_context_no_delimit", "_prompts_0shot_two_image_edit_rule", "_prompts_0shot_tie_rule_SC",
                "_prompts_0shot_rule_PQ")
DELIMITER = "||V^=^V||"


@dataclass(frozen=True)
class VieScorePrompts:
    sc: str  # with <instruction> to replace
    pq: str


def read_prompts(path: Path) -> VieScorePrompts:
    """VIEScore's edit prompts from its ``vie_prompts.py``."""
    tree = parse_python(path, "--judge-prompts")
    found: dict[str, str] = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node.value.value
    missing = [n for n in PROMPT_NAMES if n not in found]
    if missing:
        raise BagelInputError(f"--judge-prompts {path}: no {', '.join(missing)}; give VIEScore's vie_prompts.py "
                              "(the official repository's eval/gen/gedit/viescore/vie_prompts.py)")
    context, edit_rule, sc_rule, pq_rule = (found[n] for n in PROMPT_NAMES)
    return VieScorePrompts("\n".join([context, edit_rule, sc_rule]), "\n".join([context, pq_rule]))


def parse_scores(text: str) -> list[float] | None:
    """The ``score`` list of a VIEScore verdict (None when it cannot be read)."""
    text = text.strip()
    if text.count(DELIMITER) == 2:
        body = text[text.find(DELIMITER) + len(DELIMITER):text.rfind(DELIMITER)]
    elif "{" in text and "}" in text:
        body = text[text.find("{"):text.rfind("}") + 1]
    else:
        bare = text[text.find("["):text.rfind("]") + 1] if "[" in text else ""
        if re.fullmatch(r"\[\d+, ?\d+\]", bare):
            return [float(x) for x in json.loads(bare)]
        if re.fullmatch(r"\d+", text) and 0 <= int(text) <= 10:
            return [float(text)]
        return None
    try:
        score = json.loads(body.strip().replace("\n", ""))["score"]
    except (ValueError, KeyError, TypeError):
        return None
    scores = score if isinstance(score, list) else [score]
    try:
        return [float(s) for s in scores] or None
    except (TypeError, ValueError):
        return None


def judging_rows(data: str, revision: str | None = None, cache_dir: str | None = None,
                 token: str | None = None) -> list[dict[str, Any]]:
    """The dataset's text columns (no pictures): key, task_type, instruction_language, instruction and, where the
    dataset has it, Intersection_exist."""
    import pyarrow.parquet as pq

    from bagel_engine.eval.gedit import parquet_files

    rows: list[dict[str, Any]] = []
    for f in parquet_files(data, revision, cache_dir, token):
        names = pq.read_schema(f).names
        wanted = [c for c in ("key", "task_type", "instruction_language", "instruction", "Intersection_exist") if c in names]
        if len(wanted) < 4:
            raise BagelInputError(f"{f}: not GEdit-Bench's columns (key, task_type, instruction_language, instruction)")
        rows += pq.read_table(f, columns=wanted).to_pylist()
    return rows


def _jpeg_part(image) -> dict:
    import base64

    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG")
    return {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()}}


def _rows(data_rows: list[dict[str, Any]], gen_dir: Path, language: str | None) -> tuple[list[dict], int]:
    items, missing = [], 0
    for row in data_rows:
        if language is not None and row.get("instruction_language") != language:
            continue
        folder = gen_dir / "fullset" / str(row.get("task_type")) / str(row.get("instruction_language"))
        edited, source = folder / f"{row.get('key')}.png", folder / f"{row.get('key')}_SRCIMG.png"
        if row.get("task_type") not in GROUPS or not isinstance(row.get("instruction"), str):
            continue
        if not (edited.exists() and source.exists()):
            missing += 1
            continue
        items.append({**row, "edited": edited, "source": source})
    return items, missing


def statistics(records: list[dict[str, Any]], language: str, intersection: bool = False) -> dict[str, dict[str, float]]:
    """``calculate_statistics.py``: per group the mean SC, PQ and O (sqrt(SC x PQ) per row), then their mean."""
    out: dict[str, dict[str, float]] = {}
    for group in GROUPS:
        rows = [r for r in records if r["group"] == group and r["instruction_language"] == language
                and (not intersection or r["intersection_exist"])]
        if rows:
            sc = [r["sementics_score"] for r in rows]
            pq = [r["quality_score"] for r in rows]
            o = [math.sqrt(s * q) for s, q in zip(sc, pq)]
            out[group] = {"SC": sum(sc) / len(sc), "PQ": sum(pq) / len(pq), "O": sum(o) / len(o), "n": len(rows)}
    if out:
        out["average"] = {k: sum(v[k] for v in out.values()) / len(out) for k in ("SC", "PQ", "O")}
        out["average"]["groups"] = len(out) - 1
    return out


def _row_key(edited_image: str) -> tuple[str, str, str]:
    """(group, language, key) of a CSV row, from its edit's path ``.../fullset/{group}/{language}/{key}.png``."""
    parts = Path(edited_image).parts
    return parts[-3], parts[-2], Path(parts[-1]).stem


def _truthy(value) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1")


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r[k] for k in CSV_COLUMNS})
    tmp.replace(path)


def score_gedit(gen_dir: Path, data_rows: list[dict[str, Any]], prompts_file: Path, judge: Judge,
                results_dir: Path | None = None, language: str | None = None, workers: int = 4,
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    from PIL import Image

    gen_dir = Path(gen_dir)
    results_dir = Path(results_dir or gen_dir.parent / "gpt4o" / "eval_results_new")
    results_dir.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(prompts_file)
    items, missing = _rows(data_rows, gen_dir, language)
    done: dict[tuple[str, str, str], dict[str, Any]] = {}  # by (group, language, key): however OUT is spelt
    for group in GROUPS:
        for r in _read_csv(results_dir / f"bagel_{group}_gpt_score.csv"):
            done[_row_key(r["edited_image"])] = {**r, "group": group}
    todo = [it for it in items if (it["task_type"], it["instruction_language"], str(it["key"])) not in done]
    errors: dict[str, str] = {}
    unparsed: dict[str, str] = {}
    capped = finished = 0

    def ask(content: list[dict]) -> str:
        """A verdict; one that has no readable score list is asked once more, as VIEScore does."""
        text = judge.ask(content)
        return text if parse_scores(text) is not None else judge.ask(content, attempt=1)

    def one(item):
        source = Image.open(item["source"])
        edited = Image.open(item["edited"]).convert("RGB").resize(source.size)
        sc_text = ask([{"type": "text", "text": prompts.sc.replace("<instruction>", item["instruction"])},
                       _jpeg_part(source), _jpeg_part(edited)])
        pq_text = ask([{"type": "text", "text": prompts.pq}, _jpeg_part(edited)])
        return sc_text, pq_text

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(one, it) for it in todo]
        for item, future in zip(todo, futures):
            key = f"{item['task_type']}/{item['instruction_language']}/{item['key']}"
            try:
                sc_text, pq_text = future.result()
            except JudgeCapReached:
                capped += 1
            except (JudgeError, OSError) as e:
                errors[key] = str(e)
            else:
                sc, pq = parse_scores(sc_text), parse_scores(pq_text)
                if sc is None or pq is None:
                    unparsed[key] = (sc_text if sc is None else pq_text)[:500]
                else:
                    done[(item["task_type"], item["instruction_language"], str(item["key"]))] = {
                        "source_image": str(item["source"]), "edited_image": str(item["edited"]),
                        "instruction": item["instruction"], "sementics_score": min(sc), "quality_score": min(pq),
                        "intersection_exist": _truthy(item.get("Intersection_exist", False)),
                        "instruction_language": item["instruction_language"], "group": item["task_type"]}
            finished += 1
            if progress:
                progress(finished, len(todo))
    records = [{**r, "sementics_score": float(r["sementics_score"]), "quality_score": float(r["quality_score"]),
                "intersection_exist": _truthy(r["intersection_exist"])} for r in done.values()]
    for group in GROUPS:
        _write_csv(results_dir / f"bagel_{group}_gpt_score.csv", [r for r in records if r["group"] == group])
    _write_csv(results_dir / "bagel_combined_gpt_score.csv", records)
    languages = sorted({r["instruction_language"] for r in records})
    summary = {lang: {"all": statistics(records, lang), "intersection": statistics(records, lang, True)}
               for lang in languages}
    (results_dir / "gedit_scores.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    scores = {f"{lang} {k}": v for lang in languages for k, v in summary[lang]["all"].get("average", {}).items()
              if k != "groups"}
    full = all(summary[lang]["all"].get("average", {}).get("groups") == len(GROUPS) for lang in languages)
    return {"scores": scores, "summary": summary, "judged": len(records), "asked": judge.requests,
            "left_by_cap": capped, "failed": errors, "unparsed": unparsed, "no_edit_yet": missing,
            "complete": bool(records) and full and not unparsed and not missing, "results_dir": str(results_dir)}
