"""The recipe of the demo model ``bagel-shapes``: from an empty folder to a shipped model, with
the project's own modules, fixed seeds, and every stage resumable.

    bagel shapes build WORK            # data -> tokenizer -> autoencoder -> init -> bagel train -> export

Stages (each skipped when its output exists; an interrupted stage continues where it stopped):

1. ``WORK/data``: the shapes world's rows (``bagel_engine.shapes.data``).
2. ``WORK/base``: the configs (``CONFIGS``), a byte-level BPE tokenizer trained on the templates.
3. ``WORK/base/ae.safetensors``: the autoencoder trained on random pictures
   (``bagel_engine.train.autoencoder``); its latent mean and spread become the shift and scale
   factors of ``ae_config.json``; held-out reconstruction PSNR in ``WORK/ae_report.json``.
4. ``WORK/base/ema.safetensors``: random initial weights of the MoT decoder, ViT and glue.
5. ``WORK/run``: ``bagel train`` on the mixed rows (every part learns but the VAE), exported to
   ``WORK/stage1`` (the model shipped as v2).
6. ``WORK/data-refine``, ``WORK/run-refine``: a second ``bagel train`` from stage 1's (EMA) weights with a
   fresh optimizer, on new rows (another seed) with three times the question rows.
7. ``WORK/bagel-shapes``: the last checkpoint without its trainer state, plus ``task_defaults.json``.

The two stages are the steps of one recipe, not an afterthought: stage 1 is cut where its cosine ends, and
stage 2 starts from the weights stage 1 exports (the EMA), as a pre-training followed by a second phase
with another mix would.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bagel_engine.shapes import world as shapes_world
from bagel_engine.weights.files import save_safetensors

log = logging.getLogger(__name__)

# The demo model's architecture: the official topology, small.
LLM_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": 160,
    "initializer_range": 0.02, "intermediate_size": 480, "max_position_embeddings": 4096,
    "max_window_layers": 6, "model_type": "qwen2", "num_attention_heads": 4, "num_hidden_layers": 6,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "sliding_window": 4096,
    "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 512,
}
VIT_CONFIG = {  # the official loader drops the last layer: 5 here -> 4 run
    "hidden_act": "gelu_pytorch_tanh", "hidden_size": 128, "image_size": 64, "intermediate_size": 320,
    "layer_norm_eps": 1e-6, "model_type": "siglip_vision_model", "num_attention_heads": 4, "num_channels": 3,
    "num_hidden_layers": 5, "patch_size": 16,
}
AE_CONFIG = {"resolution": 64, "in_channels": 3, "ch": 32, "out_ch": 3, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1,
             "z_channels": 16, "scale_factor": 1.0, "shift_factor": 0.0}
# Tokens of 16 px, as the real model's: the VAE /8 with latent patches of 2 gives 16 latent tokens per 64x64
# picture (up to 128x128), ViT patches of 16 px 16 ViT tokens. The v3 model had tokens of 8 px (VAE /4, ViT
# patches of 8: 64 + 64 tokens a picture): a third to a quarter of the samples per step for the same compute.
BAGEL_CONFIG = {
    "latent_patch_size": 2, "max_latent_size": 8, "vit_max_num_patch_per_side": 4,
    "connector_act": "gelu_pytorch_tanh", "interpolate_pos": False, "timestep_shift": 1.0,
    "vae_transform": [64, 32, 16], "vit_transform": [64, 32, 16],
}
# The shipped model (v3) was made with tokens of 8 px: these replace the entries above.
TOKENS_OF_8PX = {"vit": {"patch_size": 8}, "ae": {"ch_mult": [1, 2, 2], "z_channels": 8},
                 "bagel": {"max_latent_size": 16, "vit_max_num_patch_per_side": 8, "vae_transform": [64, 32, 8],
                           "vit_transform": [64, 32, 8]}}
# Each recipe's choices (``bagel shapes build --recipe``): v3 made the shipped model (the default); v4 is an
# experiment, worse at mid-run than v3; v5 is v3 with position tables of contrast from the first step (the ViT's
# at norm 100, the latent one at the official table's norm, 9) and a shorter stage 2 (docs/demo-model.md).
RECIPES = {
    "v3": {"tokens_px": 8, "t2i_rows": 32000, "edit_rows": 16000, "vqa_rows": 16000, "steps": 9000,
           "refine_steps": 12000, "max_tokens": 2048},
    "v4": {"tokens_px": 16, "t2i_rows": 48000, "edit_rows": 24000, "vqa_rows": 36000, "steps": 10000,
           "refine_steps": 0, "max_tokens": 1024},
    "v5": {"tokens_px": 8, "t2i_rows": 32000, "edit_rows": 16000, "vqa_rows": 16000, "steps": 9000,
           "refine_steps": 6000, "max_tokens": 2048, "position_tables": "contrast", "vit_table_norm": 100.0,
           "latent_table_norm": 9.0},
}


# What the task methods, CLI, server and UI use with this model when the caller sets nothing: the guidance
# that scored best in a sweep on the shipped model (docs/demo-model.md; sweep seed 555, not the eval's).
TASK_DEFAULTS = {
    # t2i guidance and shift from benchmarks/shapes_sweep.py on seed 555 (docs/demo-model.md)
    "t2i": {"height": 64, "width": 64, "num_timesteps": 25, "cfg_text_scale": 3.0, "cfg_img_scale": 1.0,
            "cfg_interval": [0.0, 1.0], "timestep_shift": 2.0, "cfg_renorm_type": "global", "cfg_renorm_min": 0.0},
    "edit": {"num_timesteps": 25, "cfg_text_scale": 2.0, "cfg_img_scale": 1.5, "cfg_interval": [0.0, 1.0],
             "timestep_shift": 1.0, "cfg_renorm_type": "global", "cfg_renorm_min": 0.0},
    "understand": {"max_new_tokens": 16},
    "chat": {"max_new_tokens": 32},
}


@dataclass
class Recipe:
    """One recipe's stages; ``Recipe.of("v4", work)`` takes a named recipe's choices (``RECIPES``), the defaults
    here are v3's (the shipped model's)."""

    work: Path
    seed: int = 0
    tokens_px: int = 8  # pixels per latent / ViT token side: 8 (v3) or 16 (v4)
    t2i_rows: int = 32000
    edit_rows: int = 16000
    vqa_rows: int = 16000
    eval_rows: int = 30  # per kind, for the validation losses of the training log
    vocab_size: int = 512
    ae_steps: int = 1200
    ae_batch: int = 16
    ae_eval_pictures: int = 256  # held-out pictures for the reconstruction PSNR
    steps: int = 9000
    lr: float = 1e-3
    refine_steps: int = 12000  # stage 2 (0: ship stage 1)
    refine_lr: float = 6e-4
    refine_t2i_rows: int = 32000
    refine_edit_rows: int = 16000
    refine_vqa_rows: int = 48000  # questions learn slowest: three times stage 1's share
    # Stage 3 (0: none): stage 2's export with position tables of contrast (``contrast_position_table``) in place
    # of the official ones, trained on new rows (seed + 2, stage 2's mix) with a fresh optimizer.
    retable_steps: int = 0
    retable_lr: float = 4e-4
    vit_table_norm: float = 100.0  # the ViT tokens entering the decoder have norms of 40-190
    # 0 keeps the official latent table. Replacing it in stage 3 too (norm 12: the latent tokens' content ~7, the
    # time embedding ~11) set the trained generation path back (training MSE 0.06 -> 2.1, still 0.40 after 200 steps).
    latent_table_norm: float = 0.0
    position_tables: str = "official"  # of the random init (stage 1): "official" sin-cos or "contrast"
    max_tokens: int = 2048
    latent_cache_mb: float = 3000.0  # every picture's VAE moments (8 KB each) kept after its first encode
    threads: int | None = None
    progress: bool = True
    timings: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.position_tables not in ("official", "contrast"):
            raise ValueError(f"position_tables must be 'official' or 'contrast', not {self.position_tables!r}")

    @classmethod
    def of(cls, version: str, work: Path, **overrides) -> "Recipe":
        if version not in RECIPES:
            raise ValueError(f"no recipe {version!r} (there are {', '.join(RECIPES)})")
        return cls(work, **(RECIPES[version] | overrides))

    def configs(self) -> dict[str, dict]:
        """The llm / vit / ae / bagel configs of this recipe's architecture."""
        if self.tokens_px not in (8, 16):
            raise ValueError(f"tokens_px must be 8 or 16, not {self.tokens_px}")
        out = {"llm": LLM_CONFIG | {"vocab_size": self.vocab_size}, "vit": dict(VIT_CONFIG), "ae": dict(AE_CONFIG),
               "bagel": dict(BAGEL_CONFIG)}
        if self.tokens_px == 8:
            for part, changes in TOKENS_OF_8PX.items():
                out[part] |= changes
        return out

    # ------------------------------------------------------------------ paths
    @property
    def data(self) -> Path:
        return self.work / "data"

    @property
    def base(self) -> Path:
        return self.work / "base"

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    @property
    def stage1(self) -> Path:
        return self.work / "stage1"

    @property
    def refine_data(self) -> Path:
        return self.work / "data-refine"

    @property
    def refine_dir(self) -> Path:
        return self.work / "run-refine"

    @property
    def stage2(self) -> Path:
        return self.work / "stage2"

    @property
    def retable_data(self) -> Path:
        return self.work / "data-retable"

    @property
    def retable_dir(self) -> Path:
        return self.work / "run-retable"

    @property
    def output(self) -> Path:
        return self.work / "bagel-shapes"

    # ------------------------------------------------------------------ stages
    def make_data(self) -> None:
        from bagel_engine.shapes.data import write_dataset

        write_dataset(self.data, self.t2i_rows, self.edit_rows, self.vqa_rows, seed=self.seed,
                      eval_rows=self.eval_rows)

    def make_base(self) -> None:
        from bagel_engine.shapes.tokenizer import save_tokenizer, train_tokenizer

        self.base.mkdir(parents=True, exist_ok=True)
        if not (self.base / "tokenizer.json").exists():
            save_tokenizer(train_tokenizer(_tokenizer_corpus(self.data), self.vocab_size), self.base)
        configs = self.configs()
        for name, cfg in (("llm_config.json", configs["llm"]), ("vit_config.json", configs["vit"]),
                          ("bagel_config.json", configs["bagel"])):
            (self.base / name).write_text(json.dumps(cfg, indent=2))
        if not (self.base / "ae_config.json").exists():
            (self.base / "ae_config.json").write_text(json.dumps(configs["ae"], indent=2))
        (self.base / "task_defaults.json").write_text(json.dumps(TASK_DEFAULTS, indent=2))

    def train_autoencoder(self) -> dict:
        from bagel_engine.model.autoencoder import AutoEncoder
        from bagel_engine.shapes.data import PictureStream
        from bagel_engine.train.autoencoder import (AETrainConfig, latent_statistics, reconstruction_psnr,
                                                    save_autoencoder, train_autoencoder)
        from bagel_engine.weights.config import VAEConfig

        report_path = self.work / "ae_report.json"
        if (self.base / "ae.safetensors").exists() and report_path.exists():
            return json.loads(report_path.read_text())
        torch.manual_seed(self.seed)
        ae_base = self.configs()["ae"]
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in ae_base.items()}
        ae = AutoEncoder(VAEConfig(**cfg))
        train_cfg = AETrainConfig(steps=self.ae_steps, batch=self.ae_batch, seed=self.seed)
        history = train_autoencoder(ae, PictureStream(self.seed), train_cfg, checkpoint=self.work / "ae_train.pt",
                                    progress=self.progress)
        held_out = PictureStream(self.seed + 1_000_000)(0, self.ae_eval_pictures)
        shift, std = latent_statistics(ae, held_out)
        psnr = reconstruction_psnr(ae, held_out, sample=True, seed=self.seed)
        psnr_mean = reconstruction_psnr(ae, held_out, sample=False)
        ae_config = ae_base | {"shift_factor": round(shift, 6), "scale_factor": round(1.0 / std, 6)}
        (self.base / "ae_config.json").write_text(json.dumps(ae_config, indent=2))
        save_autoencoder(ae, self.base / "ae.safetensors")
        report = {"steps": self.ae_steps, "batch": self.ae_batch, "held_out_pictures": len(psnr),
                  "psnr_db": {"mean": sum(psnr) / len(psnr), "min": min(psnr)},
                  "psnr_db_posterior_mean": {"mean": sum(psnr_mean) / len(psnr_mean), "min": min(psnr_mean)},
                  "shift_factor": ae_config["shift_factor"], "scale_factor": ae_config["scale_factor"],
                  "last": history[-1] if history else None}
        report_path.write_text(json.dumps(report, indent=2))
        return report

    def init_weights(self) -> None:
        """Random initial weights for everything but the trained autoencoder (``ema.safetensors``)."""
        from bagel_engine.model.bagel import Bagel
        from bagel_engine.weights.config import load_model_config
        from bagel_engine.weights.loader import init_random

        path = self.base / "ema.safetensors"
        if path.exists():
            return
        cfg = load_model_config(self.base)
        with torch.device("meta"):
            model = Bagel(cfg)
        init_random(model, torch.device("cpu"), torch.float32, self.seed)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if self.position_tables == "contrast":
            state |= self.contrast_tables(state)
        tmp = path.with_suffix(".tmp")
        save_safetensors(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(path)

    def train_config(self):
        from bagel_engine.train import TrainConfig

        return TrainConfig(
            model=str(self.base), data=str(self.data / "train.jsonl"), output_dir=str(self.run_dir),
            steps=self.steps, lr=self.lr, min_lr=self.lr / 50, warmup_steps=300, schedule="cosine",
            weight_decay=0.01, max_tokens=self.max_tokens, ema=0.999, seed=self.seed, save_every=500, keep=2,
            latent_cache_mb=self.latent_cache_mb, eval_data=str(self.data / "eval.jsonl"), eval_every=1000, log_every=25, device="cpu",
            progress=self.progress)

    def refine_config(self):
        """Stage 2: from stage 1's exported weights, a fresh optimizer, new rows with more questions."""
        from dataclasses import replace

        return replace(self.train_config(), model=str(self.stage1), data=str(self.refine_data / "train.jsonl"),
                       output_dir=str(self.refine_dir), steps=self.refine_steps, lr=self.refine_lr,
                       min_lr=self.refine_lr / 50, warmup_steps=200,
                       eval_data=str(self.refine_data / "eval.jsonl"))

    def contrast_tables(self, state: dict) -> dict:
        """``vit_pos_embed`` (and ``latent_pos_embed`` when ``latent_table_norm``) tables of contrast, of the shapes
        of those in ``state``."""
        out = {}
        for name, norm in (("vit_pos_embed.pos_embed", self.vit_table_norm),
                           ("latent_pos_embed.pos_embed", self.latent_table_norm)):
            if not norm:
                continue
            rows, dim = state[name].shape
            out[name] = contrast_position_table(round(rows ** 0.5), dim, norm)
        return out

    def make_retable_base(self) -> None:
        """Stage 3's starting point: stage 2's export with the position tables of contrast."""
        from safetensors.torch import load_file

        base = self.work / "stage3-start"
        if (base / "ema.safetensors").exists():
            return
        tmp = base.with_name(base.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.stage2, tmp)
        state = load_file(tmp / "ema.safetensors")
        save_safetensors(state | self.contrast_tables(state), str(tmp / "ema.safetensors"), metadata={"format": "pt"})
        shutil.rmtree(base, ignore_errors=True)
        tmp.rename(base)

    def retable_config(self):
        """Stage 3: from ``stage3-start`` (stage 2 with the new tables), a fresh optimizer, rows of seed + 2."""
        from dataclasses import replace

        return replace(self.refine_config(), model=str(self.work / "stage3-start"),
                       data=str(self.retable_data / "train.jsonl"), output_dir=str(self.retable_dir),
                       steps=self.retable_steps, lr=self.retable_lr, min_lr=self.retable_lr / 50,
                       eval_data=str(self.retable_data / "eval.jsonl"))

    def make_retable_data(self) -> None:
        from bagel_engine.shapes.data import write_dataset

        write_dataset(self.retable_data, self.refine_t2i_rows, self.refine_edit_rows, self.refine_vqa_rows,
                      seed=self.seed + 2, eval_rows=self.eval_rows)

    def make_refine_data(self) -> None:
        from bagel_engine.shapes.data import write_dataset

        write_dataset(self.refine_data, self.refine_t2i_rows, self.refine_edit_rows, self.refine_vqa_rows,
                      seed=self.seed + 1, eval_rows=self.eval_rows)

    def train_model(self, config=None) -> Path:
        from bagel_engine.train import Trainer
        from bagel_engine.train import checkpoint as checkpoints

        config = config or self.train_config()
        latest = checkpoints.latest_checkpoint(Path(config.output_dir))
        if latest is not None and int(latest.name.split("-")[-1]) >= config.steps:
            return latest
        trainer = Trainer(config)
        return trainer.run()

    def export(self, checkpoint: Path, output: Path | None = None, steps: str | None = None) -> Path:
        """The checkpoint as the shipped model: its model files (not ``trainer/``) and the task defaults."""
        output = output or self.output
        tmp = output.with_name(output.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for src in checkpoint.iterdir():
            if src.is_file() and not src.name.startswith("."):
                shutil.copy2(src, tmp / src.name)
                (tmp / src.name).chmod(0o644)  # a model to share, not a private file
        (tmp / "task_defaults.json").write_text(json.dumps(TASK_DEFAULTS, indent=2))
        (tmp / "README.md").write_text(MODEL_README.format(steps=steps or self.steps_text(), seed=self.seed))
        shutil.rmtree(output, ignore_errors=True)
        tmp.rename(output)
        return output

    def steps_text(self) -> str:
        if not self.refine_steps:
            return f"{self.steps} steps"
        if self.retable_steps:
            return (f"{self.steps} + {self.refine_steps} + {self.retable_steps} steps in three stages, the third with "
                    "position tables of contrast")
        return f"{self.steps} + {self.refine_steps} steps in two stages"

    def run(self) -> Path:
        """Every stage in order (each skipped when done); returns the exported model directory."""
        if self.threads:
            torch.set_num_threads(self.threads)
        self.work.mkdir(parents=True, exist_ok=True)
        if not (self.stage1 / "ema.safetensors").exists():
            for name, stage in [("data", self.make_data), ("base", self.make_base),
                                ("autoencoder", self.train_autoencoder), ("init", self.init_weights)]:
                self._stage(name, stage)
            checkpoint = self._stage("train", self.train_model)
            self.export(checkpoint, self.stage1, steps=f"{self.steps} steps, stage 1")
        if not self.refine_steps:
            out = self.export(self.stage1)  # an export is a model directory: exported again with its defaults
        else:
            self._stage("refine data", self.make_refine_data)
            checkpoint = self._stage("refine", lambda: self.train_model(self.refine_config()))
            if not self.retable_steps:
                out = self.export(checkpoint)
            else:
                if not (self.stage2 / "ema.safetensors").exists():
                    self.export(checkpoint, self.stage2, steps=f"{self.steps} + {self.refine_steps} steps, stage 2")
                self._stage("retable data", self.make_retable_data)
                self._stage("retable", self.make_retable_base)
                checkpoint = self._stage("stage 3", lambda: self.train_model(self.retable_config()))
                out = self.export(checkpoint)
        print(f"[bagel-shapes] model written to {out}", flush=True)
        return out

    def _stage(self, name: str, stage):
        t0 = time.perf_counter()
        log.info("stage %s", name)
        print(f"[bagel-shapes] {name} ...", flush=True)
        result = stage()
        self._timed(name, t0)
        return result

    def _timed(self, name: str, t0: float) -> None:
        path = self.work / "timings.json"
        timings = json.loads(path.read_text()) if path.exists() else {}
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 1)
        path.write_text(json.dumps(timings, indent=2))


MODEL_README = """# bagel-shapes

A tiny BAGEL (official layout: Qwen2 MoT decoder, SigLIP NaViT, FLUX autoencoder) trained from
scratch by bagel-engine on the shapes world: flat circles, squares and triangles in six colours on
a white 64x64 canvas. It draws (`a red circle on the left`), edits (`make the square blue`) and
answers (`What color is the triangle?`). Made by `bagel shapes build` ({steps}, seed {seed});
scored by `bagel eval shapes --model bagel-shapes`. See docs/demo-model.md.
"""


def contrast_position_table(side: int, dim: int, row_norm: float) -> torch.Tensor:
    """A 2-D sin-cos position table (``row * side + col``, the layout of ``*_pos_embed``) whose rows differ
    across a grid of ``side`` patches: frequencies from pi (period 2 patches) down to pi / side (period
    2 * side), the mean row removed, rows scaled to a mean norm of ``row_norm``.

    Why: the official table (base 10000) is built for grids of ~70 patches; on the demo model's 8 x 8 grid
    most of its columns are the constant sin 0 / cos 0, its rows differ by 2-7 in norm 9, and the ViT tokens
    they are added to reach norms of 40-190: "Where is the red circle?" stayed at chance (CE 0.80 for 5
    answers over 300 steps of where-questions alone) until this table replaced it (CE ~0.1 in 250 steps,
    docs/demo-model.md). The official loader reads the table from the checkpoint, so the layout is unchanged.
    """
    k = torch.arange(dim // 4, dtype=torch.float64)
    omega = math.pi * (1.0 / side) ** (k / max(dim // 4 - 1, 1))
    coords = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def enc(pos: torch.Tensor) -> torch.Tensor:
        a = pos.reshape(-1, 1) * omega[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    table = torch.cat([enc(cols), enc(rows)], dim=1)
    table = table - table.mean(0)
    return (table * (row_norm / table.norm(dim=1).mean())).float()


def _tokenizer_corpus(data: Path) -> list[str]:
    """The texts the tokenizer learns from: every row's text, the system prompts, the world's words."""
    from bagel_engine.api import GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT

    texts = [GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT]
    texts += [" ".join([*shapes_world.COLORS, *shapes_world.SHAPES, *map(shapes_world.plural, shapes_world.SHAPES), *shapes_world.POSITIONS, *shapes_world.NUMBERS.values()])]
    with open(data / "train.jsonl") as f:
        for line in f:
            row = json.loads(line)
            texts += [row[k] for k in ("prompt", "instruction", "question", "answer") if k in row]
    return texts
