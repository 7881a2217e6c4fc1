"""ImgEdit's GPT scoring as the official scripts do it (``eval/gen/imgedit/basic_bench.py``, ``step1_get_avgscore.py``,
``step2_typescore.py``), through any OpenAI-compatible judge (``bagel_engine.eval.judge``).

For every item of the metadata whose edit exists: the prompt of its ``edit_type`` from the benchmark's own
``judge_prompt.json`` (read where the user keeps it; not shipped here) with ``<edit_prompt>`` replaced by the
instruction, then the original picture and the edit, as data URLs; the verdict text goes to ``OUT/result.jsonl``
(``{"key", "result"}``, appended as each arrives, as the official script does) and ``OUT/result.json``. The score of
an item is the mean (2 decimals) of the verdict's ``Name: digit`` lines; ``OUT/average_score.json`` holds them and
``OUT/typescore.json`` the mean per edit type and ``overall``: the files the official steps write. An item already
in ``result.jsonl`` is not asked again; ``OUT/judge.json`` names the judge, and another judge is refused for the
same folder (its verdicts would mix).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from bagel_engine.eval.common import append_jsonl
from bagel_engine.eval.judge import Judge, JudgeCapReached, JudgeError, image_part
from bagel_engine.params import BagelInputError

log = logging.getLogger(__name__)


def verdict_score(text: str) -> float | None:
    """step1_get_avgscore.py: the mean of the ``Name: digit`` lines, rounded to 2 decimals (None: none)."""
    scores = []
    for line in text.splitlines():
        parts = line.strip().split(": ")
        if len(parts) == 2 and parts[1].isdigit():
            scores.append(int(parts[1]))
    return round(sum(scores) / len(scores), 2) if scores else None


def type_scores(scores: dict[str, float], metadata: dict[str, Any]) -> dict[str, float]:
    """step2_typescore.py: the mean per edit type and overall, 2 decimals."""
    by_type: dict[str, list[float]] = {}
    for key, score in scores.items():
        edit_type = (metadata.get(key) or {}).get("edit_type")
        if edit_type is not None:
            by_type.setdefault(edit_type, []).append(score)
    out = {t: round(sum(v) / len(v), 2) for t, v in by_type.items() if v}
    if scores:
        out["overall"] = round(sum(scores.values()) / len(scores), 2)
    return out


def _done(path: Path) -> dict[str, str]:
    results: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                results[record["key"]] = record["result"]
            except (ValueError, KeyError, TypeError):
                continue
    return results


def _same_judge(path: Path, judge: Judge) -> None:
    """One judge per output folder: its verdicts are not mixed with another model's."""
    me = {"url": judge.cfg.url, "model": judge.cfg.model}
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != me:
            raise BagelInputError(f"{path.parent} was judged by {before['model']} at {before['url']}: give that judge, "
                                  "or remove its result.jsonl and judge.json to judge again")
    else:
        path.write_text(json.dumps(me), encoding="utf-8")


def score_imgedit(out_dir: Path, metadata_file: Path, image_root: Path, prompts_file: Path, judge: Judge,
                  workers: int = 4, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    out_dir, image_root = Path(out_dir), Path(image_root)
    metadata = json.loads(Path(metadata_file).read_text(encoding="utf-8"))
    try:
        prompts = json.loads(Path(prompts_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BagelInputError(f"--judge-prompts {prompts_file}: cannot read ImgEdit's judge_prompt.json ({e})") from None
    result_jsonl = out_dir / "result.jsonl"
    _same_judge(out_dir / "judge.json", judge)
    results = _done(result_jsonl)
    todo, missing = [], 0
    for key, item in metadata.items():
        if key in results:
            continue
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not isinstance(item.get("id"), str):
            log.warning("%s: no 'prompt' or 'id' in the metadata", key)
        elif not (out_dir / f"{key}.png").exists():
            missing += 1
        elif item.get("edit_type") not in prompts:
            log.warning("%s: no judge prompt for edit type %r", key, item.get("edit_type"))
        else:
            todo.append((key, item))
    errors: dict[str, str] = {}
    capped = 0

    def one(key_item):
        key, item = key_item
        content = [{"type": "text", "text": prompts[item["edit_type"]].replace("<edit_prompt>", item["prompt"])},
                   image_part(image_root / item["id"]), image_part(out_dir / f"{key}.png")]
        return key, judge.ask(content)

    done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in [pool.submit(one, kv) for kv in todo]:
            try:
                key, verdict = future.result()
                results[key] = verdict
                append_jsonl(result_jsonl, {"key": key, "result": verdict})
            except JudgeCapReached:
                capped += 1
            except (JudgeError, OSError) as e:
                errors[todo[done][0]] = str(e)
            done += 1
            if progress:
                progress(done, len(todo))
    (out_dir / "result.json").write_text(json.dumps(results, indent=4, ensure_ascii=False), encoding="utf-8")
    scores = {k: s for k, s in ((k, verdict_score(v)) for k, v in results.items()) if s is not None}
    (out_dir / "average_score.json").write_text(json.dumps(scores, indent=2), encoding="utf-8")
    types = type_scores(scores, metadata)
    (out_dir / "typescore.json").write_text(json.dumps(types, indent=2), encoding="utf-8")
    return {"scores": types, "judged": len(results), "asked": judge.requests, "left_by_cap": capped,
            "failed": errors, "no_edit_yet": missing}
