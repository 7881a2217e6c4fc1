"""Fine-tuning end to end on the tiny checkpoint: the loss falls and the checkpoint is a model that
loads and runs; resume continues exactly; frozen parts stay put; EMA is what gets published; the
command line; and two data-parallel processes train like one process over the same samples."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import bagel_engine
from bagel_engine.batch.reader import read_rows
from bagel_engine.train import TrainConfig, Trainer, train
from bagel_engine.train.data import row_sample
from bagel_engine.train.objective import training_losses
from bagel_engine.train.packing import SequencePacker
from bagel_engine.train.sample import Dropout
from golden import MODEL_DIR

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "train" / "tiny.jsonl"
NO_DROP = Dropout(0.0, 0.0, 0.0)


def config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(model=str(MODEL_DIR), data=str(DATA), output_dir=str(tmp_path / "run"), steps=4, lr=3e-3,
                warmup_steps=1, max_tokens=400, save_every=100, log_every=1, dropout=NO_DROP, progress=False)
    return TrainConfig(**(base | kw))


@torch.no_grad()
def fixed_loss(pipe) -> float:
    """Losses of every good training row at fixed flow times and noises (comparable across models)."""
    samples = [row_sample(r) for r in read_rows(DATA)[:-1]]
    packer = SequencePacker(pipe.config, pipe.tokenizer, pipe.prepare_image, NO_DROP, random.Random(0))
    batch = packer.pack(samples)
    g = torch.Generator().manual_seed(0)
    noises = [torch.randn(im.grid[0] * im.grid[1], pipe.config.patch_latent_dim, generator=g)
              for im in batch.vae_images if im.target]
    out = training_losses(pipe.model, pipe.vae, batch, timesteps=[0.2, 0.5, 0.8, 0.35, 0.65], noises=noises,
                          generator=torch.Generator().manual_seed(1))
    return float(out.total())


def test_training_lowers_the_loss_and_the_checkpoint_is_a_model(tmp_path):
    base = bagel_engine.load(MODEL_DIR, device="cpu")
    before = fixed_loss(base)
    path = train(config(tmp_path, steps=30, max_tokens=600))
    assert path.name == "checkpoint-000030" and (tmp_path / "run" / "latest").read_text().strip() == path.name
    for name in ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors", "tokenizer.json"):
        assert (path / name).exists(), name
    tuned = bagel_engine.load(path, device="cpu")
    after = fixed_loss(tuned)
    assert after < 0.7 * before, (before, after)
    # the published weights are the trained ones, under the official names and dtype
    trained = load_file(str(path / "trainer" / "model.safetensors"))
    published = load_file(str(path / "ema.safetensors"))
    assert set(published) == set(load_file(str(MODEL_DIR / "ema.safetensors")))
    for name, value in trained.items():
        assert torch.equal(published[name], value), name
    # it runs every task
    assert tuned.generate("a red circle", height=32, width=32, seed=0, num_timesteps=3).image.size == (32, 32)
    assert isinstance(tuned.chat("Say hello.", max_new_tokens=4).text, str)
    # the bad row was recorded and skipped; the log has every step
    bad = [json.loads(line) for line in (tmp_path / "run" / "bad_rows.jsonl").read_text().splitlines()]
    assert len(bad) == 1 and bad[0]["where"] == "tiny.jsonl:9" and "no_such_file.png" in bad[0]["error"]
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    assert all(r["mse"] is not None or r["ce"] is not None for r in log)


def test_resume_continues_exactly(tmp_path):
    straight = train(config(tmp_path / "a", steps=6, dropout=Dropout()))  # random dropout too
    train(config(tmp_path / "b", steps=3, dropout=Dropout()))
    resumed_trainer = Trainer(config(tmp_path / "b", steps=6, dropout=Dropout()))
    assert resumed_trainer.step == 3
    resumed = resumed_trainer.run()
    a = load_file(str(straight / "trainer" / "model.safetensors"))
    b = load_file(str(resumed / "trainer" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # packing in the loop instead of the background thread changes nothing
    inline = load_file(str(train(config(tmp_path / "c", steps=6, dropout=Dropout(), prefetch=0))
                           / "trainer" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], inline[name]), name
    # keep=2: only the two newest checkpoints stay
    assert sorted(p.name for p in (tmp_path / "b" / "run").glob("checkpoint-*")) == [
        "checkpoint-000003", "checkpoint-000006"]


def test_the_latent_cache_survives_a_resume_and_changes_no_number(tmp_path):
    cached = dict(dropout=Dropout(), latent_cache_mb=64)
    straight = train(config(tmp_path / "a", steps=6, **cached))
    train(config(tmp_path / "b", steps=3, **cached))
    shards = sorted((tmp_path / "b" / "run" / "latent_cache" / "rank0").glob("shard-*.safetensors"))
    assert len(shards) == 1
    resumed_trainer = Trainer(config(tmp_path / "b", steps=6, **cached))
    kept = resumed_trainer.latent_cache.stats()["entries"]
    assert kept > 0 and resumed_trainer.latent_cache.misses == 0  # read back, not encoded again
    resumed = resumed_trainer.run()
    a = load_file(str(straight / "trainer" / "model.safetensors"))
    b = load_file(str(resumed / "trainer" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the resumed run encoded only pictures its first part had not seen, and spilled only those
    assert resumed_trainer.latent_cache.misses == resumed_trainer.latent_cache.stats()["entries"] - kept
    new_shards = sorted((tmp_path / "b" / "run" / "latent_cache" / "rank0").glob("shard-*.safetensors"))
    assert new_shards[0] == shards[0] and len(new_shards) == (2 if resumed_trainer.latent_cache.misses else 1)
    # shards of another autoencoder are not read
    other = Trainer(config(tmp_path / "b", steps=6, **cached))
    other.vae_digest = "another"
    other.latent_cache.entries.clear()
    other.latent_cache.bytes = 0
    assert other.latent_cache.restore(other.latent_cache_dir, "another") == 0
    # a fresh start (resume=False) removes them
    Trainer(config(tmp_path / "b", steps=6, resume=False, **cached))
    assert not (tmp_path / "b" / "run" / "latent_cache").exists()


def test_frozen_parts_stay_and_ema_is_published(tmp_path):
    path = train(config(tmp_path, steps=3, freeze=("und", "vit"), ema=0.5))
    base = load_file(str(MODEL_DIR / "ema.safetensors"))
    published = load_file(str(path / "ema.safetensors"))
    raw = load_file(str(path / "trainer" / "model.safetensors"))
    ema = load_file(str(path / "trainer" / "ema.safetensors"))
    assert "language_model.model.layers.0.mlp.up_proj.weight" not in raw
    assert "vit_model.vision_model.embeddings.patch_embedding.weight" not in raw
    gen = "language_model.model.layers.0.mlp_moe_gen.up_proj.weight"
    assert gen in raw and not torch.equal(raw[gen], base[gen])
    for name, value in published.items():
        if name in raw:
            assert torch.equal(value, ema[name]) and not torch.equal(value, raw[name]), name
        else:
            assert torch.equal(value, base[name]), name


def test_bad_configs_are_refused(tmp_path):
    with pytest.raises(bagel_engine.BagelInputError, match="cannot freeze"):
        Trainer(config(tmp_path, freeze=("lm",)))
    with pytest.raises(bagel_engine.BagelInputError, match="unknown task"):
        Trainer(config(tmp_path, task="video"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a picture without its image"}\n')
    with pytest.raises(bagel_engine.BagelInputError, match="every row of the training data is bad .* found 0"):
        train(config(tmp_path / "bad", data=str(bad), steps=1, prefetch=0))
    with pytest.raises(bagel_engine.BagelInputError, match="every row of the training data is bad"):
        train(config(tmp_path / "bad2", data=str(bad), steps=1))  # raised through the background thread
    train(config(tmp_path, steps=1))
    with pytest.raises(bagel_engine.BagelInputError, match="other frozen parts"):
        Trainer(config(tmp_path, steps=2, freeze=("gen",)))


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "bagel_engine.cli.main", "train", *map(str, args)]


def test_command_line_trains_resumes_and_overwrites(tmp_path):
    args = [DATA, "-m", MODEL_DIR, "-o", tmp_path / "run", "--steps", 2, "--max-tokens", 400, "--no-progress"]
    first = subprocess.run(cli(*args, "--json"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout.strip().splitlines()[-1])
    assert out["step"] == 2 and out["checkpoint"].endswith("checkpoint-000002") and out["bad_rows"] == 1
    again = subprocess.run(cli(*args), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    more = subprocess.run(cli(*args[:-3], "--steps", 3, "--max-tokens", 400, "--no-progress"), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0 and "resuming from" in more.stdout and "trained 3 steps" in more.stdout
    fresh = subprocess.run(cli(*args, "--overwrite"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0 and "resuming" not in fresh.stdout
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-000002"]
    missing = subprocess.run(cli(tmp_path / "nope.jsonl", "-m", MODEL_DIR, "-o", tmp_path / "x"), cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr
    bad_part = subprocess.run(cli(*args, "--freeze", "und,brain"), cwd=REPO, capture_output=True, text=True,
                              timeout=300)
    assert bad_part.returncode == 2 and "cannot freeze brain" in bad_part.stderr


def equal_length_chat_rows(tmp_path: Path) -> tuple[Path, int]:
    """Eight chat rows whose samples all have the same token count n (no random draws in their loss)."""
    pipe = bagel_engine.load(MODEL_DIR, device="cpu")

    def length(r):
        return len(pipe.tokenizer.frame(r["prompt"])) + len(pipe.tokenizer.frame(r["answer"]))

    candidates = [{"prompt": f"question {c}", "answer": f"answer {c} ok"} for c in "abcdefghijklmnopqrstuvwxyz"]
    n = max({length(r) for r in candidates}, key=lambda k: sum(length(r) == k for r in candidates))
    rows = [r for r in candidates if length(r) == n][:8]
    assert len(rows) == 8
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, n


def test_gradient_accumulation_equals_one_longer_sequence(tmp_path):
    data, n = equal_length_chat_rows(tmp_path)
    common = dict(data=str(data), steps=2, lr=1e-3, warmup_steps=0, seed=3)
    one = train(config(tmp_path / "one", max_tokens=2 * n, **common))
    accumulated = train(config(tmp_path / "acc", max_tokens=n, grad_accum=2, **common))
    a = load_file(str(one / "trainer" / "model.safetensors"))
    b = load_file(str(accumulated / "trainer" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=2e-5, rtol=1e-4, msg=name)
    log = [json.loads(line) for line in (tmp_path / "acc" / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in log] == [2 * n, 2 * n]


def test_two_processes_train_like_one_over_the_same_samples(tmp_path):
    """Text rows of equal length (no random draws): two ranks with one sample each per step must
    give the update of one process packing both samples (the losses are token means over all ranks)."""
    data, n = equal_length_chat_rows(tmp_path)
    common = ["-m", MODEL_DIR, "--steps", 2, "--lr", 1e-3, "--warmup-steps", 0, "--no-progress", "--seed", 3]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(cli(data, "-o", tmp_path / "one", "--max-tokens", 2 * n, *common), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    def torchrun(out, *extra):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             "-m", "bagel_engine.cli.main", "train", str(data), "-o", str(out), "--max-tokens", str(n),
             *map(str, common), *map(str, extra)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    def weights(out, step):
        return load_file(str(out / f"checkpoint-{step:06d}" / "trainer" / "model.safetensors"))

    two = torchrun(tmp_path / "two")
    assert two.returncode == 0, two.stderr
    sharded = torchrun(tmp_path / "fsdp", "--strategy", "fsdp")
    assert sharded.returncode == 0, sharded.stderr
    # hybrid sharding as a 2 x 1 mesh (two replicas of one shard) and a 1 x 2 mesh (one replica in two shards)
    for shards in (1, 2):
        hybrid = torchrun(tmp_path / f"hsdp{shards}", "--strategy", "hsdp", "--num-shard", shards)
        assert hybrid.returncode == 0, hybrid.stderr
    a, base = weights(tmp_path / "one", 2), load_file(str(MODEL_DIR / "ema.safetensors"))
    moved = 0
    for other in (weights(tmp_path / "two", 2), weights(tmp_path / "fsdp", 2), weights(tmp_path / "hsdp1", 2),
                  weights(tmp_path / "hsdp2", 2)):
        assert other.keys() == a.keys()
        for name in a:
            torch.testing.assert_close(other[name], a[name], atol=2e-5, rtol=1e-4, msg=name)
    moved = sum(not torch.equal(a[name], base[name]) for name in a)
    assert moved > 10
    published = load_file(str(tmp_path / "fsdp" / "checkpoint-000002" / "ema.safetensors"))
    assert published.keys() == base.keys()  # the sharded run publishes the whole model
    # the sharded run resumes (optimizer state re-sharded) and keeps matching the single process
    common[common.index("--steps") + 1] = 3
    assert subprocess.run(cli(data, "-o", tmp_path / "one", "--max-tokens", 2 * n, *common), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300).returncode == 0
    # with evaluation data of one sequence: the second process runs a forward it ignores
    resumed = torchrun(tmp_path / "fsdp", "--strategy", "fsdp", "--eval-data", DATA, "--eval-every", 1)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr
    evals = [json.loads(line) for line in (tmp_path / "fsdp" / "train_log.jsonl").read_text().splitlines()
             if "eval_ce" in line]
    assert len(evals) == 1 and evals[0]["step"] == 3 and evals[0]["eval_ce"] > 0
    a3, f3 = weights(tmp_path / "one", 3), weights(tmp_path / "fsdp", 3)
    for name in a3:
        torch.testing.assert_close(f3[name], a3[name], atol=5e-5, rtol=1e-4, msg=name)
    state = torch.load(tmp_path / "two" / "checkpoint-000002" / "trainer" / "state.pt", weights_only=False)
    assert len(state["data"]) == 2
    # a two-rank checkpoint does not resume on one rank
    wrong = subprocess.run(cli(data, "-o", tmp_path / "two", "--max-tokens", n, *common[:2], "--steps", 3),
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "2 ranks" in wrong.stderr


def test_lora_trains_adapters_only_and_publishes_merged_weights(tmp_path):
    base = bagel_engine.load(MODEL_DIR, device="cpu")
    before = fixed_loss(base)
    path = train(config(tmp_path, steps=30, max_tokens=600, lora_rank=4, lora_targets="all", lr=1e-2))
    adapters = load_file(str(path / "trainer" / "model.safetensors"))
    assert adapters and all(k.endswith((".lora_A", ".lora_B")) for k in adapters)
    published = load_file(str(path / "ema.safetensors"))
    original = load_file(str(MODEL_DIR / "ema.safetensors"))
    assert published.keys() == original.keys()  # the official layout, adapters merged in
    name = "language_model.model.layers.1.mlp_moe_gen.down_proj"
    delta = adapters[f"{name}.lora_B"] @ adapters[f"{name}.lora_A"]  # alpha = rank: scale 1
    torch.testing.assert_close(published[f"{name}.weight"], original[f"{name}.weight"] + delta)
    assert torch.equal(published["language_model.model.embed_tokens.weight"],
                       original["language_model.model.embed_tokens.weight"])
    merged_loss = fixed_loss(bagel_engine.load(path, device="cpu"))
    assert merged_loss < 0.8 * before
    # the small adapter file on the base model gives the merged checkpoint
    assert (path / "adapter_model.safetensors").stat().st_size < (path / "ema.safetensors").stat().st_size
    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "LORA"  # PEFT's layout
    on_base = bagel_engine.load(MODEL_DIR, device="cpu", lora=path)
    assert fixed_loss(on_base) == pytest.approx(merged_loss, rel=1e-5)
    assert fixed_loss(bagel_engine.load(MODEL_DIR, device="cpu", lora=path, lora_strength=0.0)) == pytest.approx(
        before, rel=1e-6)
    # the command line takes it too: the same image as the merged checkpoint's, not the base model's
    gen = ["generate", "a red circle", "--height", "32", "--width", "32", "--num-timesteps", "3", "--seed", "1"]
    images = {}
    for name, extra in (("merged", ["-m", path]), ("adapter", ["-m", MODEL_DIR, "--lora", path]),
                        ("base", ["-m", MODEL_DIR])):
        out = tmp_path / f"{name}.png"
        done = subprocess.run([sys.executable, "-m", "bagel_engine.cli.main", *gen, *map(str, extra), "-o", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        images[name] = Image.open(out).convert("RGB").tobytes()  # pixels: the PNG's metadata names the model
    assert images["adapter"] == images["merged"] != images["base"]


def test_bad_adapters_are_refused(tmp_path):
    from safetensors.torch import save_file

    from bagel_engine.weights.config import ConfigError

    with pytest.raises(ConfigError, match="not found"):
        bagel_engine.load(MODEL_DIR, device="cpu", lora=tmp_path / "nothing.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ConfigError, match="not a LoRA adapter this loader knows"):
        bagel_engine.load(MODEL_DIR, device="cpu", lora=tmp_path / "plain.safetensors")
    from bagel_engine.weights.adapters import save_adapter

    name = "language_model.model.layers.0.mlp.up_proj"
    save_adapter(tmp_path / "wrong", {f"{name}.lora_A": torch.zeros(2, 7), f"{name}.lora_B": torch.zeros(5, 2)},
                 rank=2, alpha=2, targets="und")
    with pytest.raises(ConfigError, match="another base model"):
        bagel_engine.load(MODEL_DIR, device="cpu", lora=tmp_path / "wrong")


def test_lora_starts_from_the_base_model_and_merges_exactly():
    from bagel_engine.train.lora import add_lora, merged_state_dict

    pipe = bagel_engine.load(MODEL_DIR, device="cpu")
    before = fixed_loss(pipe)
    names = add_lora(pipe.model, rank=3, alpha=6, targets="gen")
    assert all("_moe_gen" in n for n in names) and len(names) == 7 * pipe.config.llm.num_hidden_layers
    assert "language_model.model.layers.0.mlp_moe_gen.up_proj" in names
    assert "language_model.model.layers.0.self_attn.q_proj_moe_gen" in names
    assert fixed_loss(pipe) == pytest.approx(before, abs=1e-6)  # B = 0: the base model exactly
    with torch.no_grad():
        for module in pipe.model.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.normal_(0, 0.05)
    adapted = fixed_loss(pipe)
    assert abs(adapted - before) > 1e-3
    merged = bagel_engine.load(MODEL_DIR, device="cpu")
    merged.model.load_state_dict(merged_state_dict(pipe.model))
    assert fixed_loss(merged) == pytest.approx(adapted, rel=1e-5)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        add_lora(pipe.model, 2, targets="vit")


def test_gradient_checkpointing_gives_the_same_gradients():
    pipe = bagel_engine.load(MODEL_DIR, device="cpu")
    samples = [row_sample(r) for r in read_rows(DATA)[:4]]
    packer = SequencePacker(pipe.config, pipe.tokenizer, pipe.prepare_image, NO_DROP, random.Random(0))
    batch = packer.pack(samples)
    grads = []
    pipe.model.requires_grad_(True)
    for checkpointing in (False, True):
        pipe.model.decoder.gradient_checkpointing = checkpointing
        pipe.model.zero_grad(set_to_none=True)
        loss = training_losses(pipe.model, pipe.vae, batch, generator=torch.Generator().manual_seed(0)).total()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in pipe.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_kill_9_mid_training_then_resume_gives_the_uninterrupted_weights(tmp_path):
    import time

    args = [DATA, "-m", MODEL_DIR, "--steps", 40, "--save-every", 5, "--max-tokens", 400, "--lr", 1e-3,
            "--no-progress", "--seed", 5, "--log-every", 10]
    straight = subprocess.run(cli(*args, "-o", tmp_path / "a"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen(cli(*args, "-o", tmp_path / "b"), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "b" / "checkpoint-000010").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "b" / "checkpoint-000040").exists(), "the run ended before it could be killed"
    resumed = subprocess.run(cli(*args, "-o", tmp_path / "b"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr
    a = load_file(str(tmp_path / "a" / "checkpoint-000040" / "trainer" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint-000040" / "trainer" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not list((tmp_path / "b").glob("*.tmp"))
    log = [json.loads(line)["step"] for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert log == [10, 20, 30, 40]  # steps redone after the kill are logged once


def test_evaluation_uses_fixed_draws_and_falls_while_training(tmp_path):
    trainer = Trainer(config(tmp_path, steps=20, max_tokens=600, eval_data=str(DATA), eval_every=10))
    first, again = trainer.evaluate(), trainer.evaluate()
    assert first == again and first["eval_mse"] > 0 and first["eval_ce"] > 0  # the same draws every time
    trainer.run()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_mse" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[-1]["eval_ce"] < 0.7 * first["eval_ce"] and evals[-1]["eval_mse"] < first["eval_mse"]
    bad = (tmp_path / "run" / "bad_rows.jsonl").read_text()
    assert "tiny.jsonl:9 (eval)" in bad


def test_check_reads_the_data_without_training(tmp_path):
    done = subprocess.run(cli(DATA, "-m", MODEL_DIR, "-o", tmp_path / "run", "--check", "--max-tokens", 400, "--json"),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rows"] == 9 and report["good"] == 8
    assert report["tasks"] == {"t2i": 3, "edit": 2, "understand": 1, "chat": 1, "conversation": 1}
    assert [b["where"] for b in report["bad"]] == ["tiny.jsonl:9"]
    assert report["tokens"] == report["image_tokens"] + report["text_tokens"]
    assert 0 < report["packing_efficiency"] <= 1 and report["sequences_per_epoch"] >= report["tokens"] / 400
    assert not (tmp_path / "run").exists()  # nothing written


def test_hybrid_sharding_mesh_shape(monkeypatch):
    """--strategy hsdp: replicas x shards, the shard groups one node (LOCAL_WORLD_SIZE) unless --num-shard says."""
    from bagel_engine.train import parallel as DP
    from bagel_engine.train import TrainConfig

    assert DP.shard_mesh_shape(2, 1) == (2, 1) and DP.shard_mesh_shape(2, 2) == (1, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert DP.shard_mesh_shape(32, None) == (4, 8)
    with pytest.raises(ValueError, match="--num-shard 3 must divide the 4 processes"):
        DP.shard_mesh_shape(4, 3)
    with pytest.raises(bagel_engine.BagelInputError, match="shard group size of --strategy hsdp"):
        TrainConfig(model="m", data="d", output_dir="o", num_shard=2).check()
