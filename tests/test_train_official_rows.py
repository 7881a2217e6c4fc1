"""The official trainer's parquet rows train as they are: text to image (``image`` bytes + ``captions``, one
variant per use) and editing (``image_list`` + ``instruction_list``, one- or multi-step by the official rules)."""

from __future__ import annotations

import io
import json
import random

import pytest
from PIL import Image

from bagel_engine.batch.reader import read_rows
from bagel_engine.train.data import official_edit_plan, official_t2i_caption, row_rng, row_sample, row_task
from bagel_engine.train.sample import Picture, Text

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def official_rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    t2i = pa.table({"image": [png("red"), png("blue")],
                    "captions": [json.dumps({"short": "a red card", "long": "a plain red card on nothing"}),
                                 json.dumps({})]})
    pq.write_table(t2i, folder / "t2i.parquet")
    edit = pa.table({"image_list": [[png("red"), png("green"), png("blue")]],
                     "instruction_list": [[["make it green", "turn it green"], ["make it blue"]]]})
    pq.write_table(edit, folder / "edit.parquet")
    return read_rows(folder / "t2i.parquet"), read_rows(folder / "edit.parquet")


def test_t2i_rows_choose_a_caption_variant_per_use(official_rows):
    t2i, _ = official_rows
    assert [row_task(r) for r in t2i] == ["official_t2i", "official_t2i"]
    seen = {row_sample(t2i[0], rng=random.Random(k)).segments[0].text for k in range(20)}
    assert seen == {"a red card", "a plain red card on nothing"}
    assert row_sample(t2i[1]).segments[0].text == " "  # no caption at all: the official " "
    sample = row_sample(t2i[0])
    assert isinstance(sample.segments[1], Picture) and sample.segments[1].target
    assert sample.segments[1].image.size == (48, 32)
    # the same row, seed and epoch draw the same caption (resume, put-back samples, every rank)
    assert row_sample(t2i[0], rng=row_rng(t2i[0], 3, 1)).segments[0].text == \
        row_sample(t2i[0], rng=row_rng(t2i[0], 3, 1)).segments[0].text


def test_edit_rows_follow_the_official_step_sampling(official_rows):
    _, edit = official_rows
    row = edit[0]
    assert row_task(row) == "official_edit"
    shapes = set()
    for k in range(200):
        start, steps = official_edit_plan(3, [["make it green", "turn it green"], ["make it blue"]], random.Random(k))
        shapes.add((start, tuple(i for _, i in steps), tuple(t for t, _ in steps)))
    # start 0 -> image 1; start 0 -> 1 -> 2 step by step; start 0 with the two steps joined (the official
    # quirk moves an end at the last image back: the joined text targets image 1); start 1 -> image 2
    assert {(s, ix) for s, ix, _ in shapes} == {(0, (1,)), (0, (1, 2)), (1, (2,))}
    joined = {texts for s, ix, texts in shapes if s == 0 and ix == (1,) and texts[0].endswith(".")}
    assert joined == {("make it green.",), ("turn it green.",)}
    # the sample of a two-step draw is the official chain plan: input (VAE, ViT), text, image 1 as target
    # and as clean context, text, image 2
    rng = next(random.Random(k) for k in range(200)
               if len(official_edit_plan(3, [["a"], ["b"]], random.Random(k))[1]) == 2)
    sample = row_sample(row, rng=rng)
    kinds = [("text" if isinstance(s, Text) else "target" if s.target else "vae" if s.as_vae else "vit")
             for s in sample.segments]
    assert kinds == ["vae", "vit", "text", "target", "vae", "vit", "text", "target"]
    assert [s.image.getpixel((0, 0)) for s in sample.segments if isinstance(s, Picture)] == [
        (255, 0, 0), (255, 0, 0), (0, 128, 0), (0, 128, 0), (0, 128, 0), (0, 0, 255)]


def test_bad_official_rows_say_why(tmp_path):
    with pytest.raises(ValueError, match="at least two images"):
        official_edit_plan(1, [], random.Random(0))
    with pytest.raises(ValueError, match="instruction_list has 1 steps for 3 images"):
        official_edit_plan(3, [["x"]], random.Random(0))
    with pytest.raises(ValueError, match="JSON object"):
        official_t2i_caption("not json", random.Random(0))


def test_a_folder_of_official_parquet_files_trains(official_rows, tmp_path):
    """A few steps on the tiny checkpoint from the two parquet files as they are (no conversion)."""
    from bagel_engine.train import TrainConfig, Trainer
    from golden import MODEL_DIR

    folder = official_rows[0][0].source.parent
    cfg = TrainConfig(model=str(MODEL_DIR), data=str(folder), output_dir=str(tmp_path / "run"), steps=2, lr=1e-4,
                      warmup_steps=1, max_tokens=2048, save_every=2, log_every=1, device="cpu", progress=False)
    trainer = Trainer(cfg)
    trainer.run()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "mse" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["mse"] > 0 for r in steps)
    assert not (tmp_path / "run" / "bad_rows.jsonl").exists() or not (tmp_path / "run" / "bad_rows.jsonl").read_text().strip()


@pytest.mark.parametrize("switch", ["no_visual_und", "no_visual_gen"])
def test_visual_switches_train_only_what_they_need(tmp_path, switch):
    """T2I-only (--no-visual-und) and VLM-only (--no-visual-gen) runs: the rows that need the missing part are
    bad rows, no ViT token is made without the ViT, and only the needed parameters learn."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from bagel_engine.train import TrainConfig, Trainer
    from golden import MODEL_DIR

    data = Path(__file__).parent / "data" / "train" / "tiny.jsonl"
    visual_gen, visual_und = switch != "no_visual_gen", switch != "no_visual_und"
    cfg = TrainConfig(model=str(MODEL_DIR), data=str(data), output_dir=str(tmp_path / "run"), steps=2, lr=1e-3,
                      warmup_steps=1, max_tokens=4096, save_every=2, log_every=1, device="cpu", progress=False,
                      visual_gen=visual_gen, visual_und=visual_und)
    trainer = Trainer(cfg)
    batch = next(iter(trainer.data))
    if not visual_und:
        assert batch.vit_patches.shape[0] == 0 and batch.vae_images  # edits keep their VAE condition only
    else:
        assert not batch.vae_images  # nothing to generate, no VAE condition
    trainer.run()
    before = load_file(MODEL_DIR / "ema.safetensors")
    after = load_file(next((tmp_path / "run").glob("checkpoint-*")) / "ema.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    vit = {k for k in changed if k.startswith(("vit_model.", "connector."))}
    gen = {k for k in changed if "_moe_gen" in k or k.startswith(("vae2llm.", "llm2vae.", "time_embedder."))}
    if not visual_und:
        assert not vit and gen
    else:
        assert not gen and vit
    bad = (tmp_path / "run" / "bad_rows.jsonl").read_text()
    assert ("--no-visual-und" in bad) == (not visual_und) and ("--no-visual-gen" in bad) == (not visual_gen)


@pytest.fixture(scope="module")
def official_layout(tmp_path_factory, official_rows):
    """A miniature of the official example: a YAML with the three groups and its registry, parquet folders
    for t2i and editing, a LLaVA JSONL with an image folder."""
    import shutil

    root = tmp_path_factory.mktemp("bagel_example")
    (root / "t2i").mkdir()
    (root / "editing").mkdir()
    (root / "vlm" / "images").mkdir(parents=True)
    shutil.copy(official_rows[0][0].source, root / "t2i" / "part0.parquet")
    shutil.copy(official_rows[1][0].source, root / "editing" / "part0.parquet")
    Image.new("RGB", (48, 32), "green").save(root / "vlm" / "images" / "g.png")
    lines = [{"image": "g.png", "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"},
                                                   {"from": "gpt", "value": "Green."}]},
             {"image": ["g.png", "g.png"], "conversations": [{"from": "human", "value": "<image><image>\nSame?"},
                                                              {"from": "gpt", "value": "Yes."}]}]
    (root / "vlm" / "llava.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "example.yaml").write_text("""
t2i_pretrain:
  dataset_names: [t2i]
  image_transform_args: {image_stride: 8, max_image_size: 32, min_image_size: 16}
  is_mandatory: true
  num_used_data: [3]
  weight: 1
unified_edit:
  dataset_names: [seedxedit_multi]
  is_mandatory: false
  num_used_data: [2]
  weight: 1
vlm_sft:
  dataset_names: [llava_ov]
  image_transform_args: {image_stride: 14, max_image_size: 56, min_image_size: 28, max_pixels: 2_007_040}
  is_mandatory: true
  shuffle_lines: true
  shuffle_seed: 0
  num_used_data: [2]
  weight: 1
dataset_info:
  t2i_pretrain:
    t2i: {data_dir: t2i, num_files: 1, num_total_samples: 2}
  unified_edit:
    seedxedit_multi: {data_dir: editing, num_files: 1, num_total_samples: 1}
  vlm_sft:
    llava_ov: {data_dir: vlm/images, jsonl_path: vlm/llava.jsonl, num_total_samples: 2}
""")
    return root / "example.yaml"


def test_the_official_yaml_mix_reads_packs_resumes_and_trains(official_layout, tmp_path):
    import bagel_engine
    from bagel_engine.train import TrainConfig, Trainer
    from bagel_engine.train.official_mix import MixedStream, read_official_config
    from bagel_engine.train.packing import SequencePacker
    from golden import MODEL_DIR

    groups = read_official_config(official_layout)
    # t2i: its one file used 3 times (num_used_data counts files, repeated as the official code does)
    assert [(g.name, len(g.rows), g.mandatory) for g in groups] == [
        ("t2i_pretrain", 6, True), ("unified_edit", 2, False), ("vlm_sft", 2, True)]
    assert groups[2].rows[0].folder == official_layout.parent / "vlm" / "images"  # images next to data_dir

    pipe = bagel_engine.load(MODEL_DIR, device="cpu")

    def stream():
        packer = SequencePacker(pipe.config, pipe.tokenizer, lambda im, key, resize=None: pipe.prepare_image(im, key, resize=resize))
        return MixedStream(read_official_config(official_layout), packer, max_tokens=1200, seed=5)

    a = stream()
    first = next(a)
    saved = a.state()
    rest = [next(a) for _ in range(3)]
    b = stream()
    b.restore(json.loads(json.dumps(saved)))  # as a checkpoint stores it
    again = [next(b) for _ in range(3)]
    for x, y in zip(rest, again):  # a resumed stream goes on with exactly the same sequences
        assert torch_equal(x.text_ids, y.text_ids) and x.sample_lens == y.sample_lens
    assert first.sample_lens and not a.bad
    # every sequence starts with a sample of each mandatory group (t2i, then the conversation)
    assert all(len(s.sample_lens) >= 2 for s in [first, *rest])

    cfg = TrainConfig(model=str(MODEL_DIR), data=str(official_layout), output_dir=str(tmp_path / "run"), steps=2,
                      lr=1e-4, warmup_steps=1, max_tokens=1200, save_every=1, log_every=1, device="cpu", progress=False)
    Trainer(cfg).run()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "mse" in r] == [1, 2]


def test_a_group_s_image_transform_args_resize_its_pictures(official_layout):
    """t2i_pretrain's image_transform_args are its VAE rule (48x32 -> 32x24 at max 32 / min 16 / stride 8, not the
    model's 64 / 32 / 4, which keeps 48x32); vlm_sft's are its ViT rule; unified_edit has none: the model's."""
    import bagel_engine
    from bagel_engine.train.official_mix import MixedStream, read_official_config
    from bagel_engine.train.packing import SequencePacker
    from bagel_engine.train.sample import ImageTransforms
    from golden import MODEL_DIR

    groups = read_official_config(official_layout)
    assert [g.transforms for g in groups] == [ImageTransforms(vae=(32, 16, 8, None)), None,
                                              ImageTransforms(vit=(56, 28, 14, 2007040))]
    pipe = bagel_engine.load(MODEL_DIR, device="cpu")
    sizes = []

    def prepare(image, key, resize=None):
        out = pipe.prepare_image(image, key, resize=resize)
        sizes.append((resize, tuple(out.vae_pixels.shape[1:]), tuple(out.vit_pixels.shape[1:])))
        return out

    stream = MixedStream([groups[0]], SequencePacker(pipe.config, pipe.tokenizer, prepare), max_tokens=1200, seed=5)
    batch = next(stream)
    d = pipe.config.latent_downsample
    assert {s[1] for s in sizes} == {(24, 32)}  # (H, W) by the group's rule
    assert len(batch.vae_indexes) == len(batch.sample_lens) * (24 // d) * (32 // d)
    plain = pipe.prepare_image(Image.new("RGB", (48, 32)), "x")
    assert tuple(plain.vae_pixels.shape[1:]) == (32, 48)  # the model's own rule keeps it
    with pytest.raises(ValueError, match="max_pixel|not among"):
        from bagel_engine.train.official_mix import group_transforms
        group_transforms("t2i_pretrain", {"image_transform_args": {"image_stride": 8, "max_image_size": 32,
                                                                   "min_image_size": 16, "max_pixel": 5}})


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_check_reports_an_official_mix(official_layout):
    from typer.testing import CliRunner

    import bagel_engine.cli.train_cmd  # noqa: F401 - registers `train`
    from bagel_engine.cli.main import app
    from golden import MODEL_DIR

    r = CliRunner().invoke(app, ["train", str(official_layout), "-o", "/tmp/unused", "-m", str(MODEL_DIR), "--check",
                                 "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["groups"]["vlm_sft"] == {"rows": 2, "weight": 1.0, "mandatory": True}
    assert report["rows"] == 10 and report["good"] == 10 and not report["bad"]
    assert report["tasks"] == {"official_t2i": 6, "official_edit": 2, "conversation": 2}


def test_a_killed_official_yaml_run_resumes_where_it_stopped(official_layout, tmp_path):
    """``bagel train example.yaml`` killed with SIGKILL after its first checkpoint, then run again: it resumes
    from that checkpoint and ends with the weights of a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from golden import MODEL_DIR

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out):
        return [sys.executable, "-m", "bagel_engine.cli.main", "train", str(official_layout), "-m", str(MODEL_DIR),
                "-o", str(out), "--steps", "10", "--save-every", "2", "--keep", "10", "--max-tokens", "1200",
                "--lr", "1e-4", "--warmup-steps", "1", "--seed", "4", "--no-progress"]

    whole = subprocess.run(command(tmp_path / "whole"), cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = subprocess.Popen(command(tmp_path / "killed"), cwd=repo, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (tmp_path / "killed" / "checkpoint-000002").exists() and time.monotonic() < deadline:
        if killed.poll() is not None:
            break
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(60) == -signal.SIGKILL  # killed mid-run, not finished
    assert not (tmp_path / "killed" / "checkpoint-000010").exists()
    again = subprocess.run(command(tmp_path / "killed"), cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout + again.stderr
    a = load_file(tmp_path / "whole" / "checkpoint-000010" / "trainer" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoint-000010" / "trainer" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5, msg=name)


def test_video_rows_sample_frames_by_the_official_rules(tmp_path):
    """LLaVA video rows: a folder of frames and an animated GIF, their frames drawn by the official rules (a count
    in [min, max], one frame per interval, in order), ``<video>`` standing for them; a video file without a decoder
    and a conversation without ``<video>`` are bad rows that say why."""
    import random

    from bagel_engine.batch.reader import read_rows
    from bagel_engine.train.data import row_sample
    from bagel_engine.train.sample import Picture, Text
    from bagel_engine.train.video import FrameSampling, frame_indices

    rng = random.Random(0)
    for _ in range(50):
        picked = frame_indices(20, 4, rng)
        assert picked == sorted(picked) and len(set(picked)) == 4
        assert all(5 * i <= f < 5 * i + 4 for i, f in enumerate(picked))  # one per interval, never its last frame
    short = frame_indices(3, 5, random.Random(0))
    assert len(short) == 5 and short[3:] == [short[2], short[2]]  # the last frame repeated

    frames = tmp_path / "clip"
    frames.mkdir()
    for n in range(10):  # named as the official frame folders are: ..._<n>.jpg, sorted by n
        Image.new("RGB", (16, 16), (n * 25, 0, 0)).save(frames / f"frame_{n}.jpg")
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (16, 16), (0, 0, 0)).save(gif, save_all=True, append_images=[
        Image.new("RGB", (16, 16), (0, 10 * k, 0)) for k in range(1, 12)], duration=40)
    (tmp_path / "movie.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    chat = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "It gets brighter."}]
    rows = [{"video": "clip/", "conversations": chat}, {"video": "anim.gif", "conversations": chat},
            {"video": "movie.mp4", "conversations": chat},
            {"video": "clip/", "conversations": [{"from": "human", "value": "No placeholder"}, chat[1]]}]
    data = tmp_path / "videos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = read_rows(data)
    sampling = FrameSampling(max_num_frames=4, min_num_frames=3)
    for row in read[:2]:
        sample = row_sample(row, "auto", random.Random(7), sampling)
        pictures = [s for s in sample.segments if isinstance(s, Picture)]
        assert 3 <= len(pictures) <= 4
        assert isinstance(sample.segments[len(pictures)], Text)  # the frames, then the question
        order = [p.image.getpixel((8, 8)) for p in pictures]
        assert order == sorted(order)  # in the video's order
        again = row_sample(row, "auto", random.Random(7), sampling)  # the row's generator: the same frames
        assert [p.image.getpixel((8, 8)) for p in again.segments if isinstance(p, Picture)] == order
    from bagel_engine.params import BagelInputError

    with pytest.raises(BagelInputError, match="PyAV"):
        row_sample(read[2], "auto", random.Random(0), sampling)
    with pytest.raises(BagelInputError, match="no <video> placeholder"):
        row_sample(read[3], "auto", random.Random(0), sampling)
    assert FrameSampling.from_args({"max_num_frames": 12, "min_num_frames": 8}) == FrameSampling(12, 8)
    with pytest.raises(BagelInputError, match="min_num_frames <= max_num_frames"):
        FrameSampling.from_args({"max_num_frames": 2, "min_num_frames": 8})
    (tmp_path / "mix.yaml").write_text("""
vlm_sft:
  dataset_names: [videos]
  frame_sampler_args: {max_num_frames: 4, min_num_frames: 3}
  is_mandatory: true
  weight: 1
dataset_info:
  vlm_sft:
    videos: {data_dir: ., jsonl_path: videos.jsonl, num_total_samples: 4}
""")
    from bagel_engine.train.official_mix import read_official_config

    (group,) = read_official_config(tmp_path / "mix.yaml")
    assert group.frames == sampling and len(group.rows) == 4
    sample = row_sample(group.rows[1], "auto", random.Random(3), group.frames)
    assert 3 <= sum(isinstance(s, Picture) for s in sample.segments) <= 4
