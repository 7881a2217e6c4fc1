"""WISE's GPT scoring as the official scripts do it (``eval/gen/wise/gpt_eval_mp.py`` and ``cal_score.py``), through
any OpenAI-compatible judge (``bagel_engine.eval.judge``).

The judge's protocol, its system message and the user text around each prompt and its explanation, is read from the
user's own copy of WISE's ``gpt_eval_mp.py`` (its ``build_evaluation_messages``, parsed, never run; nothing of it is
shipped here). For every entry of the metadata whose picture ``IMAGES/{prompt_id}.png`` exists: the system message,
then the protocol text with the entry's fields and the picture; temperature 0 and at most 2,000 tokens, as the script
asks. A verdict's scores are its ``Consistency``, ``Realism`` and ``Aesthetic Quality`` digits (a missing one is the
script's 9.9, "not scored"). The records go to ``OUT/{stem}_full.jsonl`` and ``OUT/{stem}_scores.jsonl`` (``stem``: the
metadata file's name, as the script names them), appended as each verdict arrives; an entry already there is not
asked again, and a failed request is not written (a rerun asks it again, where the script would keep a 9.9). The
summary covers every ``*_scores.jsonl`` of ``OUT``: WISE's three files scored one after the other add up, as
``cal_score.py`` reads them.

``cal_score.py``'s arithmetic: WiScore = 0.7 consistency + 0.2 realism + 0.1 aesthetic quality, a category's score its
sum over 2 x its count; the categories by prompt id as WISE's three files split them (1-400 cultural; 401-700
spatio-temporal, Time for the longitudinal and horizontal time subcategories, else Space; 701-800 biology, 801-900
physics, 901-1000 chemistry); Overall the mean of the six. ``cal_score.py`` skips a file holding a 9.9 or fewer
entries than the benchmark's; here those categories are scored on what was judged and the summary says it is not
the official figure (``complete``: false).
"""

from __future__ import annotations

import ast
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bagel_engine.eval.common import append_jsonl, parse_python
from bagel_engine.eval.judge import Judge, JudgeCapReached, JudgeError, image_part
from bagel_engine.params import BagelInputError

log = logging.getLogger(__name__)

NOT_SCORED = 9.9  # the official script's value for a score its verdict lacks
METRICS = ("consistency", "realism", "aesthetic_quality")
CATEGORIES = ("Cultural", "Time", "Space", "Biology", "Physics", "Chemistry")
FULL_COUNTS = {"Cultural": 400, "Spatio-temporal": 300, "Natural science": 300}  # cal_score.py's minimum per file
TIME_SUBCATEGORIES = ("Longitudinal time", "Horizontal time")
_SCORE = re.compile(r"\*{0,2}(consistency|realism|aesthetic quality)\*{0,2}\s*[:：]?\s*(\d)", re.IGNORECASE)


@dataclass(frozen=True)
class Protocol:
    """The judge's messages: the system text, and the user text as literal pieces and ``(field,)`` slots."""

    system: str
    parts: tuple[str | tuple[str], ...]

    def user_text(self, entry: dict[str, Any]) -> str:
        return "".join(p if isinstance(p, str) else str(entry.get(p[0], "")) for p in self.parts)


def _text_parts(node: ast.AST) -> tuple[str | tuple[str], ...] | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return (node.value,)
    if not isinstance(node, ast.JoinedStr):
        return None
    parts: list[str | tuple[str]] = []
    for piece in node.values:
        if isinstance(piece, ast.Constant):
            parts.append(piece.value)
        elif (isinstance(piece, ast.FormattedValue) and isinstance(piece.value, ast.Subscript)
              and isinstance(piece.value.slice, ast.Constant)):
            parts.append((piece.value.slice.value,))
        else:
            return None
    return tuple(parts)


def read_protocol(script: Path) -> Protocol:
    """The system and user texts of ``build_evaluation_messages`` in WISE's ``gpt_eval_mp.py``."""
    tree = parse_python(script, "--judge-script")
    texts: dict[str, tuple] = {}
    for fn in ast.walk(tree):
        if not (isinstance(fn, ast.FunctionDef) and fn.name == "build_evaluation_messages"):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, ast.Dict):
                continue
            fields = {k.value: v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)}
            role = fields.get("role")
            if not (isinstance(role, ast.Constant) and isinstance(fields.get("content"), ast.List)):
                continue
            for part in fields["content"].elts:
                if isinstance(part, ast.Dict):
                    inner = {k.value: v for k, v in zip(part.keys, part.values) if isinstance(k, ast.Constant)}
                    if "text" in inner and role.value not in texts:
                        found = _text_parts(inner["text"])
                        if found is not None:
                            texts[role.value] = found
    if "user" not in texts:
        raise BagelInputError(f"--judge-script {script}: no build_evaluation_messages with a user text in it; give WISE's "
                              "own eval/gen/wise/gpt_eval_mp.py (the official BAGEL repository has it)")
    system = "".join(p for p in texts.get("system", ()) if isinstance(p, str))
    return Protocol(system, texts["user"])


def verdict_scores(text: str) -> dict[str, float]:
    """The three scores of a verdict (the last of each name counts; 9.9 where one is missing)."""
    scores = dict.fromkeys(METRICS, NOT_SCORED)
    for name, digit in _SCORE.findall(text):
        scores[name.lower().replace(" ", "_")] = float(digit)
    return scores


def wiscore(scores: dict[str, float]) -> float:
    return 0.7 * scores["consistency"] + 0.2 * scores["realism"] + 0.1 * scores["aesthetic_quality"]


def category(record: dict[str, Any]) -> tuple[str, str] | None:
    """(category, WISE file) of a scored entry by its prompt id, as ``cal_score.py`` splits them."""
    pid = record.get("prompt_id")
    if not isinstance(pid, int):
        return None
    if 1 <= pid <= 400:
        return "Cultural", "Cultural"
    if 401 <= pid <= 700:
        return ("Time" if record.get("Subcategory") in TIME_SUBCATEGORIES else "Space"), "Spatio-temporal"
    for low, name in ((701, "Biology"), (801, "Physics"), (901, "Chemistry")):
        if low <= pid <= low + 99:
            return name, "Natural science"
    return None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The category scores, Overall, and whether they are the official figure (every file whole, nothing at 9.9)."""
    by_cat: dict[str, list[float]] = {}
    per_file: dict[str, int] = {}
    unscored = 0
    for r in records:
        where = category(r)
        if where is None:
            continue
        if any(r[m] == NOT_SCORED for m in METRICS):
            unscored += 1
            continue
        by_cat.setdefault(where[0], []).append(wiscore(r))
        per_file[where[1]] = per_file.get(where[1], 0) + 1
    scores = {c: sum(v) / (2 * len(v)) for c in CATEGORIES if (v := by_cat.get(c))}
    if scores:
        scores["Overall"] = sum(scores.values()) / len(scores)
    short = {f: per_file.get(f, 0) for f, n in FULL_COUNTS.items() if per_file.get(f, 0) < n}
    return {"scores": scores, "counts": {c: len(v) for c, v in by_cat.items()}, "unscored": unscored,
            "complete": not short and not unscored and len(scores) == len(CATEGORIES) + 1, "short_files": short}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill: judged again
    return out


def score_wise(out_dir: Path, metadata_file: Path, script: Path, judge: Judge, images: Path | None = None,
               workers: int = 4, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    out_dir, images = Path(out_dir), Path(images or out_dir)
    protocol = read_protocol(script)
    try:
        entries = json.loads(Path(metadata_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BagelInputError(f"{metadata_file}: cannot read WISE's metadata ({e})") from None
    if not isinstance(entries, list):
        raise BagelInputError(f"{metadata_file}: a JSON list of {{'prompt_id', 'Prompt', ...}} entries expected")
    stem = Path(metadata_file).stem
    full_path, scores_path = out_dir / f"{stem}_full.jsonl", out_dir / f"{stem}_scores.jsonl"
    done = {r.get("prompt_id") for r in _read_jsonl(scores_path)} & {r.get("prompt_id") for r in _read_jsonl(full_path)}
    todo, missing = [], 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt_id"), int) or "Prompt" not in entry:
            log.warning("a WISE entry without prompt_id or Prompt: %s", str(entry)[:120])
        elif entry["prompt_id"] in done:
            continue
        elif not (images / f"{entry['prompt_id']}.png").exists():
            missing += 1
        else:
            todo.append(entry)
    errors: dict[int, str] = {}
    capped = finished = 0

    def one(entry):
        picture = images / f"{entry['prompt_id']}.png"
        content = [{"type": "text", "text": protocol.user_text(entry)}, image_part(picture)]
        return entry, picture, judge.ask(content, system=protocol.system or None)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(one, e) for e in todo]
        for entry, future in zip(todo, futures):
            try:
                entry, picture, verdict = future.result()
            except JudgeCapReached:
                capped += 1
            except (JudgeError, OSError) as e:
                errors[entry["prompt_id"]] = str(e)
            else:
                verdict = verdict.strip()
                full = {"prompt_id": entry["prompt_id"], "prompt": entry["Prompt"], "key": entry.get("Explanation"),
                        "image_path": str(picture), "evaluation": verdict}
                scored = {"prompt_id": entry["prompt_id"], "Subcategory": entry.get("Subcategory"),
                          **verdict_scores(verdict)}
                append_jsonl(full_path, full)
                append_jsonl(scores_path, scored)
            finished += 1
            if progress:
                progress(finished, len(todo))
    # the summary covers every metadata file judged into this folder (WISE's three, scored one by one, as the
    # official run does; or final_data.json): cal_score.py reads all three
    latest = {r["prompt_id"]: r for path in sorted(out_dir.glob("*_scores.jsonl")) for r in _read_jsonl(path)
              if "prompt_id" in r}
    judged_here = {r["prompt_id"] for r in _read_jsonl(scores_path) if "prompt_id" in r}
    summary = summarize(list(latest.values()))
    (out_dir / "wise_scores.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    names = [c for c in (*CATEGORIES, "Overall") if c in summary["scores"]]
    (out_dir / "results.txt").write_text(" ".join(names) + " \n" + " ".join(f"{summary['scores'][c]:.2f}" for c in names)
                                         + " \n", encoding="utf-8")
    return {**summary, "judged": len(judged_here), "asked": judge.requests, "left_by_cap": capped, "failed": errors,
            "no_image_yet": missing}
