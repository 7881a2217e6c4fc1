"""GPT-judged scoring through an OpenAI-compatible endpoint, against a fake judge served over loopback: ImgEdit's
official scoring steps (the verdict files, the mean of 'Name: digit' lines, per edit type and overall), the
benchmark's own prompt file, the key from the environment, retries, the verdict cache and the request cap."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from bagel_engine.eval.imgedit_score import score_imgedit, type_scores, verdict_score
from bagel_engine.eval.judge import Judge, JudgeConfig, JudgeError

PROMPTS = {"add": "Judge the addition: <edit_prompt>. Answer as 'Name: score' lines.",
           "style": "Judge the style change: <edit_prompt>."}


class FakeJudge:
    """A chat-completions endpoint: 'hat' edits score 4/3/5, others 2/2; the first request of a run gets a 503."""

    def __init__(self, fail_first: bool = True, answer=None):
        self.requests: list[dict] = []
        self.answer = answer  # body -> verdict text (default: the ImgEdit verdicts above)
        self.auth: list[str | None] = []
        self.fail_first = fail_first
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.auth.append(self.headers.get("Authorization"))
                if judge.fail_first:
                    judge.fail_first = False
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b"busy")
                    return
                judge.requests.append(body)
                text = body["messages"][0]["content"][0]["text"]
                if judge.answer is not None:
                    verdict = judge.answer(body)
                else:
                    verdict = ("Prompt Compliance: 4\nVisual Naturalness: 3\nPhysical & Detail Integrity: 5" if "hat" in text
                               else "Prompt Compliance: 2\nVisual Naturalness: 2\nnotes: fine")
                out = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": verdict}, "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture()
def fake():
    judge = FakeJudge()
    yield judge
    judge.close()


def benchmark(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "singleturn"
    root.mkdir(parents=True)
    meta = {"1": {"id": "a.png", "prompt": "Add a hat", "edit_type": "add"},
            "2": {"id": "b.png", "prompt": "Make it a sketch", "edit_type": "style"},
            "3": {"id": "b.png", "prompt": "Add a dog", "edit_type": "add"},
            "4": {"id": "b.png", "prompt": "not made yet", "edit_type": "add"}}
    (root / "singleturn.json").write_text(json.dumps(meta))
    (root / "judge_prompt.json").write_text(json.dumps(PROMPTS))
    out = tmp_path / "bagel"
    out.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8), (200, 0, 0)).save(root / f"{name}.png")
    for key in ("1", "2", "3"):
        Image.new("RGB", (8, 8), (0, 0, 200)).save(out / f"{key}.png")
    return root / "singleturn.json", out


def test_the_official_score_arithmetic():
    assert verdict_score("Prompt Compliance: 4\nVisual Naturalness: 3\nnote: x") == 3.5
    assert verdict_score("no scores at all") is None
    assert type_scores({"1": 4.0, "2": 2.0, "3": 3.0}, {"1": {"edit_type": "add"}, "2": {"edit_type": "style"},
                                                         "3": {"edit_type": "add"}}) == {"add": 3.5, "style": 2.0,
                                                                                          "overall": 3.0}


def test_imgedit_scoring_resume_and_cap(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "judge-secret")
    meta, out = benchmark(tmp_path)
    judge = Judge(JudgeConfig(fake.url, "gpt-4o-2024-11-20", backoff_s=0.01), out / "judge_cache.jsonl")
    report = score_imgedit(out, meta, meta.parent, meta.parent / "judge_prompt.json", judge, workers=1)
    assert report["scores"] == {"add": 3.0, "style": 2.0, "overall": 2.67} and report["no_edit_yet"] == 1
    assert json.loads((out / "average_score.json").read_text()) == {"1": 4.0, "2": 2.0, "3": 2.0}
    assert json.loads((out / "typescore.json").read_text())["overall"] == 2.67
    assert set(json.loads((out / "result.json").read_text())) == {"1", "2", "3"}
    first = fake.requests[0]
    assert first["model"] == "gpt-4o-2024-11-20"
    content = first["messages"][0]["content"]
    assert content[0]["text"] == "Judge the addition: Add a hat. Answer as 'Name: score' lines."  # the file's prompt
    assert [p["type"] for p in content] == ["text", "image_url", "image_url"]  # original, then the edit
    assert set(fake.auth) == {"Bearer judge-secret"} and len(fake.requests) == 3  # the 503 was retried
    # a rerun asks nothing: every verdict is in result.jsonl
    again = score_imgedit(out, meta, meta.parent, meta.parent / "judge_prompt.json",
                          Judge(JudgeConfig(fake.url, "gpt-4o-2024-11-20"), out / "judge_cache.jsonl"), workers=1)
    assert again["asked"] == 0 and again["scores"] == report["scores"] and len(fake.requests) == 3
    # another judge on the same folder is refused: the verdicts would mix
    with pytest.raises(ValueError, match="was judged by gpt-4o-2024-11-20"):
        score_imgedit(out, meta, meta.parent, meta.parent / "judge_prompt.json",
                      Judge(JudgeConfig(fake.url, "another-model"), out / "judge_cache.jsonl"), workers=1)
    # the cap: one new request, the rest left for a rerun
    meta2, out2 = benchmark(tmp_path / "second")
    capped = score_imgedit(out2, meta2, meta2.parent, meta2.parent / "judge_prompt.json",
                           Judge(JudgeConfig(fake.url, "m", max_requests=1), out2 / "judge_cache.jsonl"), workers=1)
    assert capped["asked"] == 1 and capped["left_by_cap"] == 2 and capped["judged"] == 1


def test_a_judge_that_refuses_is_reported_per_item(tmp_path):
    judge = Judge(JudgeConfig("http://127.0.0.1:9/v1", "m", retries=1, backoff_s=0.01), tmp_path / "c.jsonl")
    with pytest.raises(JudgeError, match="cannot reach"):
        judge.ask([{"type": "text", "text": "hello"}])
    with pytest.raises(ValueError, match="judge-url"):
        Judge(JudgeConfig("api.openai.com", "m"), tmp_path / "c.jsonl")


def test_the_command(tmp_path):
    fake = FakeJudge(fail_first=False)
    try:
        meta, out = benchmark(tmp_path)
        r = subprocess.run([sys.executable, "-m", "bagel_engine", "eval", "score", "imgedit", str(meta), "-o", str(out),
                            "--judge-url", fake.url, "--judge-model", "gpt-4o-2024-11-20", "--json"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        assert summary["scores"]["overall"] == 2.67 and summary["asked"] == 3
    finally:
        fake.close()


WISE_SCRIPT = """
def build_evaluation_messages(prompt_data, image_base64):
    return [
        {"role": "system", "content": [{"type": "text", "text": "You audit pictures."}]},
        {"role": "user", "content": [
            {"type": "text", "text": f\"\"\"Score the picture.
PROMPT: "{prompt_data['Prompt']}"
EXPLANATION: "{prompt_data['Explanation']}"
Answer as Consistency / Realism / Aesthetic Quality lines.\"\"\"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_base64}"}},
        ]},
    ]
"""


def test_wise_scoring_as_the_official_scripts(tmp_path, monkeypatch):
    """WISE's protocol read from (a miniature of) its gpt_eval_mp.py, the system message sent first, the verdicts'
    digits into the official record files, cal_score.py's WiScore per category, and a rerun that asks nothing."""
    from bagel_engine.eval.wise_score import read_protocol, score_wise, summarize, verdict_scores

    script = tmp_path / "gpt_eval_mp.py"
    script.write_text(WISE_SCRIPT)
    protocol = read_protocol(script)
    assert protocol.system == "You audit pictures."
    entry = {"Prompt": "Mooncakes", "Explanation": "round pastries"}
    assert 'PROMPT: "Mooncakes"\nEXPLANATION: "round pastries"' in protocol.user_text(entry)

    assert verdict_scores("**Consistency**: 2\nRealism: 1\nAesthetic Quality：0") == {
        "consistency": 2.0, "realism": 1.0, "aesthetic_quality": 0.0}
    assert verdict_scores("Consistency: 1")["realism"] == 9.9

    entries = [{"prompt_id": 3, "Prompt": "cultural one", "Explanation": "e", "Subcategory": "Festival"},
               {"prompt_id": 420, "Prompt": "a time one", "Explanation": "e", "Subcategory": "Horizontal time"},
               {"prompt_id": 650, "Prompt": "a space one", "Explanation": "e", "Subcategory": "Occlusion"},
               {"prompt_id": 705, "Prompt": "biology", "Explanation": "e", "Subcategory": "State"},
               {"prompt_id": 999, "Prompt": "not drawn", "Explanation": "e", "Subcategory": "x"}]
    metadata = tmp_path / "final_data.json"
    metadata.write_text(json.dumps(entries))
    out = tmp_path / "out"
    out.mkdir()
    for e in entries[:4]:
        Image.new("RGB", (8, 8), "red").save(out / f"{e['prompt_id']}.png")

    def answer(body):
        assert body["messages"][0]["role"] == "system" and body["temperature"] == 0.0
        text = body["messages"][1]["content"][0]["text"]
        return "Consistency: 2\nRealism: 2\nAesthetic Quality: 2" if "cultural" in text else \
            "Consistency: 1\nRealism: 0\nAesthetic Quality: 1"

    fake = FakeJudge(fail_first=False, answer=answer)
    try:
        judge = Judge(JudgeConfig(fake.url, "gpt-4o", max_tokens=2000, temperature=0.0), out / "judge_cache.jsonl")
        report = score_wise(out, metadata, script, judge)
        assert report["judged"] == 4 and report["no_image_yet"] == 1 and report["asked"] == 4
        # WiScore / 2: cultural (0.7*2 + 0.2*2 + 0.1*2) / 2 = 1.0; the others (0.7 + 0 + 0.1) / 2 = 0.4
        scores = report["scores"]
        assert scores["Cultural"] == pytest.approx(1.0) and scores["Time"] == pytest.approx(0.4)
        assert scores["Space"] == pytest.approx(0.4) and scores["Biology"] == pytest.approx(0.4)
        assert scores["Overall"] == pytest.approx((1.0 + 3 * 0.4) / 4)
        assert not report["complete"] and report["short_files"]  # 4 entries are not WISE's 1,000
        records = [json.loads(line) for line in (out / "final_data_scores.jsonl").read_text().splitlines()]
        assert {r["prompt_id"] for r in records} == {3, 420, 650, 705}
        assert {"prompt_id", "Subcategory", "consistency", "realism", "aesthetic_quality"} == set(records[0])
        full = [json.loads(line) for line in (out / "final_data_full.jsonl").read_text().splitlines()]
        assert {"prompt_id", "prompt", "key", "image_path", "evaluation"} == set(full[0])
        assert (out / "results.txt").read_text().split("\n")[0].split() == ["Cultural", "Time", "Space", "Biology",
                                                                             "Overall"]
        # a rerun asks nothing; a new picture is judged alone, after a line cut by a kill
        with open(out / "final_data_scores.jsonl", "a") as f:
            f.write('{"prompt_id": 1')
        Image.new("RGB", (8, 8), "red").save(out / "999.png")
        again = score_wise(out, metadata, script, Judge(JudgeConfig(fake.url, "gpt-4o", temperature=0.0),
                                                        out / "judge_cache.jsonl"))
        assert again["asked"] == 1 and again["judged"] == 5 and len(fake.requests) == 5
        assert json.loads((out / "final_data_scores.jsonl").read_text().splitlines()[-1])["prompt_id"] == 999
        # another of WISE's files scored into the same folder adds up in the summary
        other = tmp_path / "natural_science.json"
        other.write_text(json.dumps([{"prompt_id": 850, "Prompt": "physics", "Explanation": "e", "Subcategory": "x"}]))
        Image.new("RGB", (8, 8), "red").save(out / "850.png")
        both = score_wise(out, other, script, Judge(JudgeConfig(fake.url, "gpt-4o", temperature=0.0),
                                                    out / "judge_cache.jsonl"))
        assert both["judged"] == 1 and {"Cultural", "Physics", "Chemistry"} <= set(both["scores"])
    finally:
        fake.close()
    assert summarize([{"prompt_id": 5, "Subcategory": "x", "consistency": 9.9, "realism": 1, "aesthetic_quality": 1}])[
        "unscored"] == 1
    bad = tmp_path / "other.py"
    bad.write_text("x = 1\n")
    from bagel_engine.params import BagelInputError

    with pytest.raises(BagelInputError, match="no build_evaluation_messages"):
        read_protocol(bad)


VIE_PROMPTS = '''
_context_no_delimit = """You are a judge of edits."""
_prompts_0shot_two_image_edit_rule = """Two pictures: the source, then the edit."""
_prompts_0shot_tie_rule_SC = """Score the edit: <instruction>. Answer ||V^=^V|| {"score": [a, b]} ||V^=^V||"""
_prompts_0shot_rule_PQ = """Score how natural the picture is."""
'''


def test_gedit_scoring_as_the_official_scripts(tmp_path, monkeypatch):
    """VIEScore's prompts read from (a miniature of) vie_prompts.py, SC from the source and the edit, PQ from the edit,
    the minimum of each score list, the script's CSVs per group and calculate_statistics.py's means."""
    import math

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from bagel_engine.eval.gedit_score import judging_rows, parse_scores, read_prompts, score_gedit, statistics

    prompts_file = tmp_path / "vie_prompts.py"
    prompts_file.write_text(VIE_PROMPTS)
    prompts = read_prompts(prompts_file)
    assert prompts.sc.startswith("You are a judge of edits.\nTwo pictures") and "<instruction>" in prompts.sc
    assert prompts.pq == "You are a judge of edits.\nScore how natural the picture is."
    assert parse_scores('x ||V^=^V|| {"score": [8, 6], "reasoning": "ok"} ||V^=^V||') == [8.0, 6.0]
    assert parse_scores('{"score": 7}') == [7.0] and parse_scores("[3, 4]") == [3.0, 4.0] and parse_scores("9") == [9.0]
    assert parse_scores("no idea") is None

    rows = [{"key": "k1", "task_type": "color_alter", "instruction_language": "en", "instruction": "make it blue",
             "Intersection_exist": True},
            {"key": "k2", "task_type": "color_alter", "instruction_language": "en", "instruction": "make it red",
             "Intersection_exist": False},
            {"key": "k3", "task_type": "style_change", "instruction_language": "en", "instruction": "as a sketch",
             "Intersection_exist": True},
            {"key": "k4", "task_type": "style_change", "instruction_language": "en", "instruction": "unreadable",
             "Intersection_exist": True},
            {"key": "k6", "task_type": "tone_transfer", "instruction_language": "en", "instruction": "second try",
             "Intersection_exist": False},
            {"key": "k5", "task_type": "style_change", "instruction_language": "cn", "instruction": "not made yet",
             "Intersection_exist": True}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gedit.parquet")
    gen = tmp_path / "run" / "gen_image"
    judge_calls = []
    for r in rows[:5]:
        folder = gen / "fullset" / r["task_type"] / r["instruction_language"]
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 12), "red").save(folder / f"{r['key']}_SRCIMG.png")
        Image.new("RGB", (32, 32), "blue").save(folder / f"{r['key']}.png")

    def answer(body):
        content = body["messages"][0]["content"]
        text = content[0]["text"]
        if "Score the edit" in text:
            assert len(content) == 3 and content[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
            if "unreadable" in text:
                return "I cannot say."
            if "second try" in text:
                judge_calls.append(text)
                return "not sure" if len(judge_calls) == 1 else '{"score": [5, 5]}'  # read on the second asking
            return '||V^=^V|| {"score": [8, 6], "reasoning": "r"} ||V^=^V||' if "blue" in text else '{"score": [4, 9]}'
        assert len(content) == 2  # the edit alone
        return '{"score": [7, 9]}'

    fake = FakeJudge(fail_first=False, answer=answer)
    try:
        data_rows = judging_rows(str(tmp_path / "gedit.parquet"))
        judge = Judge(JudgeConfig(fake.url, "gpt-4.1", max_tokens=1400), tmp_path / "cache.jsonl")
        report = score_gedit(gen, data_rows, prompts_file, judge)
        assert report["judged"] == 4 and report["no_edit_yet"] == 1 and list(report["unparsed"]) == [
            "style_change/en/k4"]
        assert len(judge_calls) == 2  # the unreadable verdict asked once more, and read
        assert report["summary"]["en"]["all"]["tone_transfer"]["SC"] == 5.0
        results = tmp_path / "run" / "gpt4o" / "eval_results_new"
        with open(results / "bagel_color_alter_gpt_score.csv") as f:
            lines = f.read().splitlines()
        assert lines[0] == ("source_image,edited_image,instruction,sementics_score,quality_score,intersection_exist,"
                            "instruction_language") and len(lines) == 3
        en = report["summary"]["en"]["all"]
        # color_alter: SC min(8,6)=6 and min(4,9)=4, PQ 7 and 7; style_change: SC 4, PQ 7
        assert en["color_alter"]["SC"] == pytest.approx(5.0) and en["color_alter"]["PQ"] == pytest.approx(7.0)
        assert en["color_alter"]["O"] == pytest.approx((math.sqrt(42) + math.sqrt(28)) / 2)
        assert en["average"]["SC"] == pytest.approx((5.0 + 4.0 + 5.0) / 3) and en["average"]["groups"] == 3
        assert report["summary"]["en"]["intersection"]["color_alter"]["SC"] == pytest.approx(6.0)
        assert not report["complete"]
        asked = len(fake.requests)
        monkeypatch.chdir(tmp_path)  # the same folder spelt another way: still the same rows
        again = score_gedit(Path("run/gen_image"), data_rows, prompts_file,
                            Judge(JudgeConfig(fake.url, "gpt-4.1", max_tokens=1400), tmp_path / "cache.jsonl"),
                            results_dir=tmp_path / "run" / "gpt4o" / "eval_results_new")
        assert again["asked"] == 0 and len(fake.requests) == asked and again["judged"] == 4  # from the CSVs and cache
        with open(tmp_path / "run" / "gpt4o" / "eval_results_new" / "bagel_combined_gpt_score.csv") as f:
            assert len(f.read().splitlines()) == 5  # nothing counted twice
    finally:
        fake.close()
    assert statistics([], "en") == {}
