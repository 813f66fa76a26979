"""Callbacks of the training stack: checkpoints, periodic plots, the step progress bar and the run summary."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar

from lit.plots import plot_memory

LAST_NAME = "last"
BEST_NAME = "best"


TEMP_SUFFIX = ".partial"


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the previous file at its path is untouched."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically next to their final path: the bytes go to a temporary file in
    the same folder (``.last.ckpt.<pid>.partial``), are flushed and fsynced, and only then replace
    the old file with ``os.replace`` (and the folder is fsynced). A kill or a full disk at any
    point leaves the previous checkpoint complete; a failed save raises :class:`CheckpointSaveError`
    naming the cause and the last complete checkpoint."""

    def __init__(self):
        self.saved_steps: dict[str, int] = {}  # path -> global step, of the saves of this process

    @staticmethod
    def write(handle, data: bytes) -> None:
        """Write ``data`` to the open temporary file (one place for fault-injection tests to patch)."""
        handle.write(data)

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        import io

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
        try:
            with open(temp, "wb") as handle:
                self.write(handle, buffer.getbuffer())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
            _fsync_dir(path.parent)
        except OSError as err:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise CheckpointSaveError(err.errno, self.failure(path, err)) from err
        self.saved_steps[str(path)] = int(checkpoint.get("global_step", -1))

    def failure(self, path: Path, err: OSError) -> str:
        cause = err.strerror or str(err)
        good = last_complete_checkpoint(path.parent)
        if good is None:
            kept = "no complete checkpoint exists yet"
        else:
            step = self.saved_steps.get(str(good))
            kept = f"the last complete checkpoint is {good}" + (f" (step {step})" if step is not None else "")
        return f"saving checkpoint {path} failed: {cause}; {kept}"


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def last_complete_checkpoint(folder: Path) -> Optional[Path]:
    """``last.ckpt`` if present, else the newest other ``*.ckpt`` (temporary files never count)."""
    folder = Path(folder)
    last = folder / f"{LAST_NAME}.ckpt"
    if last.is_file():
        return last
    others = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return others[-1] if others else None


def remove_partial_checkpoints(folder: Path) -> list[Path]:
    """Delete the temporary files of saves that were killed (call with the run folder locked)."""
    removed = []
    for temp in Path(folder).glob(f".*{TEMP_SUFFIX}") if Path(folder).is_dir() else []:
        with contextlib.suppress(OSError):
            temp.unlink()
            removed.append(temp)
    return removed


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


class StepProgressBar(TQDMProgressBar):
    """One training bar over the whole run: optimizer step N / ``max_steps`` with its ETA, across
    epochs and from the resumed step (Lightning's own bar restarts at every epoch)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step  # the rate and ETA count this run's steps only
        bar.set_description("step")

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self.train_progress_bar.set_description(f"step (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class RunSummary(Callback):
    """What a run did, for the block printed at its end: validation loss (final and best, with the
    step), steps, tokens/s and wall time of this invocation."""

    def __init__(self, monitor: str = "val/ppl"):
        super().__init__()
        self.monitor = monitor
        self.start_time: Optional[float] = None
        self.start_step = 0
        self.tokens = 0
        self.final: Optional[tuple[int, float]] = None  # (step, val loss)
        self.best: Optional[tuple[int, float]] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_time, self.start_step = time.time(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, dict) and "input_ids" in batch:
            self.tokens += batch["input_ids"].numel() * trainer.world_size

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or not float(value) > 0:
            return
        loss = math.log(float(value))
        self.final = (trainer.global_step, loss)
        if self.best is None or loss < self.best[1]:
            self.best = (trainer.global_step, loss)

    def lines(self, trainer: L.Trainer, places: dict) -> list[str]:
        seconds = time.time() - (self.start_time or time.time())
        steps = trainer.global_step - self.start_step
        out = [f"{'steps':<12} {self.start_step} -> {trainer.global_step} (max_steps {trainer.max_steps}) "
               f"in {_duration(seconds)}; {self.tokens / max(seconds, 1e-9):,.0f} tokens/s"
               + (f", {steps / max(seconds, 1e-9):.2f} steps/s" if steps else "")]
        since = f" (validations since step {self.start_step})" if self.start_step else ""
        for name, point in (("final", self.final), ("best", self.best)):
            if point is not None:
                out.append(f"{name + ' val':<12} loss {point[1]:.4f}  ppl {math.exp(point[1]):.3f}  (step {point[0]}){since if name == 'best' else ''}")
        if self.final is None:
            out.append(f"{'val':<12} no validation ran in this invocation")
        out += [f"{name:<12} {where}" for name, where in places.items() if where]
        return out


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
