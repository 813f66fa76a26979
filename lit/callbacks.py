"""Callbacks of the training stack: checkpoints and periodic plots."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit.plots import plot_memory

LAST_NAME = "last"
BEST_NAME = "best"


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``, refreshed every ``every_n_train_steps`` optimizer steps and when training ends.

    A plain ``ModelCheckpoint(save_last=True, save_top_k=0)`` with two additions: the final
    step is always saved (Lightning only saves on its step period or after validation), and
    no version suffixes (``last-v1.ckpt``): there is one ``last.ckpt`` per run folder.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int):
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps,
                         enable_version_counter=False)
        self.CHECKPOINT_NAME_LAST = LAST_NAME

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


def best_checkpoint(dirpath: str, monitor: str = "val/ppl", mode: str = "min") -> ModelCheckpoint:
    """``best.ckpt``: the checkpoint with the best ``monitor`` so far, written after validation."""
    return ModelCheckpoint(dirpath=dirpath, filename=BEST_NAME, monitor=monitor, mode=mode, save_top_k=1,
                           save_last=False, enable_version_counter=False, auto_insert_metric_name=False)


class MemoryPlots(Callback):
    """Every ``every_n_steps`` optimizer steps (rank 0): gate histograms and slot-usage maps of each
    fast-weight layer for the last training batch, as PNG files in ``out_dir`` and as MLflow
    artifacts under ``plots/`` when an MLflow logger is attached."""

    def __init__(self, out_dir: str, every_n_steps: int):
        self.out_dir = Path(out_dir)
        self.every_n_steps = int(every_n_steps)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        memory = getattr(pl_module, "last_memory", None)
        if not memory:
            return
        n_slots = {i: getattr(m, "config", None) for i, m in pl_module.model.fast_weight_memories().items()}
        paths = plot_memory(memory, n_slots, self.out_dir, step)
        log_artifacts(trainer, paths, "plots")


def mlflow_logger(trainer: L.Trainer):
    from lightning.pytorch.loggers import MLFlowLogger

    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            return logger
    return None


def log_artifacts(trainer: L.Trainer, paths: list, artifact_path: Optional[str] = None) -> None:
    """Log files to the run's MLflow artifacts (rank 0, when an MLflow logger is attached)."""
    logger = mlflow_logger(trainer)
    if logger is None or not trainer.is_global_zero:
        return
    for path in paths:
        if os.path.isfile(path):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)
