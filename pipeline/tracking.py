"""Where training scalars go: TensorBoard event files, and Weights & Biases through the optional ``wandb`` extra.

Each learner of a pass gets one ``Tracker``, which sends every scalar to each configured
tracker: TensorBoard under ``<run>/tensorboard/<pass>/<learner>``, and a W&B run named
``<pass>/<learner>`` in the group of the run directory, written under ``<run>/wandb``. W&B
runs offline unless ``WANDB_MODE`` says otherwise, so a run needs no network or account;
``wandb sync <run>/wandb/offline-run-*`` uploads it later.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

TRACKERS = ("tensorboard", "wandb")
WANDB_PROJECT = "kdcache"


class Tracker:
    """One learner's scalars, sent to every tracker it holds (none: dropped)."""

    def __init__(self, tensorboard=None, wandb_run=None):
        self.tensorboard, self.wandb_run = tensorboard, wandb_run

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({tag: float(value)}, step=int(step))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def open_trackers(kinds: tuple[str, ...], run_dir: Path, group: str, names: list[str], config: dict) -> list[Tracker]:
    """One tracker per learner ``names`` of pass ``group`` of the run in ``run_dir``, recording to ``kinds``.

    Raises:
        ConfigError: wandb asked for and not installed.
    """
    tensorboard = wandb = None
    if "tensorboard" in kinds:
        from torch.utils.tensorboard import SummaryWriter

        tensorboard = lambda name: SummaryWriter(str(run_dir / "tensorboard" / group / name))  # noqa: E731
    if "wandb" in kinds:
        wandb = _wandb_runs(run_dir, group, config)
    return [Tracker(tensorboard and tensorboard(name), wandb and wandb(name)) for name in names]


def _wandb_runs(run_dir: Path, group: str, config: dict):
    try:
        import wandb
    except ImportError:
        raise ConfigError("distill.trackers names wandb: install it (pip install 'kdcache[wandb]')") from None
    settings = wandb.Settings(silent=True, console="off")
    mode = os.environ.get("WANDB_MODE", "offline")

    def start(name: str):
        return wandb.init(project=WANDB_PROJECT, dir=str(run_dir), group=run_dir.name, job_type=group,
                          name=f"{group}/{name}", config=config, mode=mode, reinit="create_new",
                          settings=settings)  # fmt: skip

    return start
