"""Where training figures go besides ``train_log.jsonl``: TensorBoard or Weights & Biases, the
dashboards users of accelerate and diffusers scripts expect (``--report-to tensorboard|wandb|none``).

Each reporter takes the same records the JSONL log gets (``{"step": 10, "mse": ..., "lr": ...}``) and
writes every number in them as a scalar at that step: ``train/mse``, ``train/ce``, ``train/lr``,
``train/tokens_per_s`` ... and ``eval/eval_mse`` for evaluation records. Only rank 0 reports.

    reporter = open_reporter("tensorboard", Path("runs/a"), config={"lr": 2e-5})
    reporter.log({"step": 10, "mse": 0.21}); reporter.close()

TensorBoard event files go to ``OUTPUT/tensorboard/`` (``tensorboard --logdir OUTPUT/tensorboard``);
wandb runs go to the project named by ``WANDB_PROJECT`` (default ``bagel-engine``) and resume with the run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Protocol

from bagel_engine.params import BagelInputError

log = logging.getLogger(__name__)

CHOICES = ("none", "tensorboard", "wandb")


class Reporter(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """A log record -> (step, {"train/mse": 0.21, ...}); evaluation figures (``eval_*``) go under ``eval/``."""
    step = int(record["step"])
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(float(value)):
            continue
        out[f"{'eval' if key.startswith('eval_') else 'train'}/{key}"] = float(value)
    return step, out


class NoReporter:
    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardReporter:
    def __init__(self, folder: Path, config: dict[str, Any], resume_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise BagelInputError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from e
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        # a resumed run drops the events logged after its checkpoint, as train_log.jsonl does
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=resume_step + 1 if resume_step else None)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())))
        log.info("reporting to TensorBoard in %s (tensorboard --logdir %s)", folder, folder)

    def log(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, folder: Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError as e:
            raise BagelInputError("--report-to wandb needs the wandb package: pip install wandb") from e
        import os

        folder.mkdir(parents=True, exist_ok=True)
        run_id = folder / "wandb-run-id"  # the same run continues when training resumes
        if not run_id.exists():
            run_id.write_text(wandb.util.generate_id() + "\n")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "bagel-engine"), config=config,
                              dir=str(folder), id=run_id.read_text().strip(), resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def open_reporter(report_to: str, output_dir: Path, config: dict[str, Any], resume_step: int = 0) -> Reporter:
    """The reporter ``report_to`` names (one of :data:`CHOICES`); ``resume_step``: the step a resumed run
    continues from."""
    if report_to == "none":
        return NoReporter()
    if report_to == "tensorboard":
        return TensorBoardReporter(Path(output_dir) / "tensorboard", config, resume_step)
    if report_to == "wandb":
        return WandbReporter(Path(output_dir), config)
    raise BagelInputError(f"unknown --report-to {report_to!r}; choose one of {', '.join(CHOICES)}")
