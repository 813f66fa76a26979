"""The LightningModule that trains any :class:`fwpkm.HybridLM` configuration.

What it does (spec sections 5-6):

* next-token cross-entropy on ``{"input_ids", "labels"}`` batches (labels -100 carry no loss);
* AdamW with two parameter groups: weight decay on matrices only, none on norms, biases
  and parameters marked ``_no_weight_decay`` (``A_log``, ``dt_bias``). Fast weights are
  buffers, never parameters, so they never reach the optimizer;
* linear warm-up then cosine decay to ``min_lr``, stepped every optimizer step;
* gradient clipping by global norm (``OptimConfig.grad_clip``; the Trainer's
  ``gradient_clip_val`` wins when set);
* the FA->SWA trick: with probability ``p`` a training step runs every full-attention layer as
  sliding-window attention of the memory chunk size. The coin of step ``s`` is drawn from a
  generator seeded by ``(seed, s)``, so it needs no RNG state and resumes exactly;
* logging every step: loss, perplexity, lr, tokens/s, gradient norm and, per fast-weight
  layer, the memorisation and addressing losses, the gate mean, the addressing statistics
  (collision, coverage, KL to uniform) and the inner-gradient norms;
* validation perplexity per validation set (torchmetrics), the first set also as ``val/ppl``.

Fast-weight state
-----------------
The fast weights are registered buffers of the memory layers. They persist from one
training step to the next, are part of ``state_dict`` and therefore of every checkpoint,
and come back on resume with the weights.

Validation never leaks into training: the training state is snapshotted when a
validation (or test) epoch starts, every validation set starts from that same training
state (the memory keeps writing *within* a set, batch after batch, as in training), and
the snapshot is restored when the epoch ends, so training continues with exactly the state
it had before validating.

Distributed training (DDP, and FSDP where it applies)
------------------------------------------------------
The data module shards every global batch (world size x ``data.batch_size`` rows, logged as
the ``data.global_batch_size`` param) by rank: the ranks read disjoint rows
(:class:`lit.data.ResumableSampler`).
Each rank writes its own batch into its memory during the forward pass. Policy
``TrainConfig.ddp_fast_weights``:

* ``"mean"`` (default): right after the forward of every training step the fast-weight
  buffers are averaged over the ranks (one ``all_reduce`` of the flattened buffers). Every
  rank then holds the same memory, which is the state rank 0 saves in checkpoints, so a
  checkpoint is coherent and resuming on any number of ranks is well defined. Averaging
  the per-rank updates theta + mean_r(delta_r) is the data-parallel analogue of one write
  with the global batch, not the same write: with the N_read-scaled step a slot that only
  some ranks read moves by that fraction of the one-process step. Measured on the micro
  model (tests/test_train.py, 2 ranks x 2 rows against 1 process x 4 rows, the same rows):
  the validation loss agrees within 1e-3 while the value tables differ. Cost: one
  all_reduce of the memory per step, the same order as the gradient all_reduce of the
  slow PKM values.
* ``"local"``: every rank keeps its own memory (no communication). Checkpoints hold rank 0's
  memory; on resume every rank starts from it.

DDP's own buffer broadcast (``broadcast_buffers=True``, rank 0 -> all before every
forward) would silently discard every other rank's writes; it is switched off in
:meth:`FwPKMLitModule.setup`. FSDP shards parameters only: the fast-weight buffers stay
whole on every rank, so the same policy applies unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from fwpkm import HybridLM, ModelConfig
from fwpkm.config import ConfigError, from_mapping
from fwpkm.layers import compute_dtype
from lit.config import DEFAULT_PRESET, MISSING, OptimConfig, RunConfig, TrainConfig, changed_paths, leaves

CHECKPOINT_KEY = "fwpkm"  # our own section of a Lightning checkpoint
CHECKPOINT_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss or gradient under ``nan_policy="stop"``; the message has the step and layer statistics."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded safely, or does not match the configured model."""


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``optim.lr`` at optimizer step ``step``: linear warm-up, cosine to ``min_lr``."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, max(0.0, (step - optim.warmup_steps) / span))
    lr = optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr / optim.lr


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (>= 2 dims); none on norms, biases, ``_no_weight_decay``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def fa_to_swa_coin(seed: int, step: int, prob: float) -> bool:
    """The FA->SWA decision of a step: a pure function of (seed, step), so resuming needs no RNG state."""
    if prob <= 0.0:
        return False
    if prob >= 1.0:
        return True
    return random.Random(f"{seed}/fa_to_swa/{step}").random() < prob


# --------------------------------------------------------------------------- the module


class FwPKMLitModule(L.LightningModule):
    """Train a hybrid FwPKM language model.

    Args:
        model: the model configuration (a :class:`ModelConfig` or its dict).
        optim: AdamW and learning-rate schedule.
        train: FA->SWA probability, NaN policy, plot period, DDP fast-weight policy.
        seed: seeds the FA->SWA coin (the run's ``seed_everything``).
        preset: the preset the model configuration started from (a label of the run).
    """

    def __init__(
        self,
        model: Optional[Union[ModelConfig, dict]] = None,
        optim: Optional[Union[OptimConfig, dict]] = None,
        train: Optional[Union[TrainConfig, dict]] = None,
        seed: int = 0,
        preset: str = DEFAULT_PRESET,
    ):
        super().__init__()
        self.optim_config = from_mapping(OptimConfig, optim, "optim")
        self.train_config = from_mapping(TrainConfig, train, "train")
        self.preset, self.seed = preset, int(seed)
        self.model = HybridLM(from_mapping(ModelConfig, model, "model"))
        self.save_hyperparameters({
            "model": self.model_config.to_dict(),
            "optim": dataclasses.asdict(self.optim_config),
            "train": dataclasses.asdict(self.train_config),
            "seed": self.seed,
            "preset": preset,
        })
        self._log_hyperparams = False  # the tracking callback logs the full run config itself
        self.val_names: list[str] = []
        self.val_ppl = torch.nn.ModuleList()
        self.val_acc = torch.nn.ModuleList()  # next-token accuracy on the labelled positions
        self.last_memory: dict = {}  # layer -> {"indices", "gates"} of the last training step (for plots)
        self.skipped_batches = 0
        self._val_state: Optional[dict] = None
        self._val_loader: int = -1
        self._skip_snapshot: Optional[dict] = None
        self._step_start: Optional[float] = None
        self._grad_norm: Optional[Tensor] = None

    @classmethod
    def from_run_config(cls, config: RunConfig) -> "FwPKMLitModule":
        return cls(config.model, config.optim, config.train, config.seed_everything, config.preset)

    # ----------------------------------------------------------------- properties

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    @property
    def fa_to_swa_prob(self) -> float:
        p = self.train_config.fa_to_swa_prob
        return self.model_config.fa_to_swa_prob if p is None else p

    # ----------------------------------------------------------------- setup

    def setup(self, stage: str) -> None:
        _disable_ddp_buffer_broadcast(self.trainer)
        datamodule = getattr(self.trainer, "datamodule", None)
        names = list(getattr(datamodule, "val_names", None) or ["val"])
        if names != self.val_names:
            from torchmetrics.classification import MulticlassAccuracy
            from torchmetrics.text import Perplexity

            self.val_names = names
            self.val_ppl = torch.nn.ModuleList(Perplexity(ignore_index=-100) for _ in names)
            self.val_acc = torch.nn.ModuleList(
                MulticlassAccuracy(self.model_config.vocab_size, average="micro", ignore_index=-100) for _ in names)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None and tokenizer.vocab_size > self.model_config.vocab_size:
            raise ConfigError(f"data.tokenizer={getattr(tokenizer, 'name', tokenizer)!r} has vocab_size="
                              f"{tokenizer.vocab_size} but the model was built with vocab_size="
                              f"{self.model_config.vocab_size}: token ids would not fit")

    def configure_optimizers(self):
        o = self.optim_config
        groups = parameter_groups(self.model, o.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        total = o.decay_steps or self._default_decay_steps()

        def factor(step: int) -> float:
            return lr_factor(step, o, total)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _default_decay_steps(self) -> int:
        trainer = self._trainer
        if trainer is None:
            return 1
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        total = trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) else 1

    # ----------------------------------------------------------------- training

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, **kwargs):
        return self.model(input_ids, labels=labels, **kwargs)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int):
        step = self.global_step
        fa_to_swa = fa_to_swa_coin(self.seed, step, self.fa_to_swa_prob)
        skip_mode = self.train_config.nan_policy == "skip"
        self._skip_snapshot = self.model.fast_weight_state() if skip_mode else None
        out = self.model(batch["input_ids"], labels=batch["labels"], fa_to_swa=fa_to_swa)
        plain_loss = loss = out.loss
        if "loss_weights" in batch:  # data.facts_answer_weight: train on the weighted loss, log both
            loss = weighted_loss(out.logits, batch["labels"], batch["loss_weights"])
            self.log("train/weighted_loss", loss.detach(), on_step=True, on_epoch=False, batch_size=len(batch["labels"]))
        if "query_pairs" in batch:  # data.facts_query_weight: the supervised address (a lab knob)
            q_loss = query_loss(out.memory, batch["query_pairs"], batch["query_weight"])
            loss = loss + q_loss
            self.log("train/query_loss", q_loss.detach(), on_step=True, on_epoch=False, batch_size=len(batch["labels"]))
        stats = memory_stats(out)
        bad = not bool(torch.isfinite(loss.detach()))
        if self.trainer.world_size > 1:  # every rank must take the same branch
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            return self._non_finite("loss", loss.detach(), stats)
        self._sync_fast_weights()
        self.last_memory = {i: {"indices": mo.indices, "gates": mo.gates} for i, mo in out.memory.items()}
        self._log_train_step(plain_loss.detach(), stats, fa_to_swa, batch["input_ids"].shape[0])
        return loss

    def _non_finite(self, what: str, value: Tensor, stats: dict):
        step = self.global_step
        report = _format_stats(stats)
        bad_buffers = [k for k, t in self.model.fast_weight_state().items() if not torch.isfinite(t).all()]
        message = (f"non-finite {what} ({float(value):.6g}) at global step {step} (epoch {self.current_epoch}); "
                   f"fast-weight buffers with NaN/Inf: {bad_buffers or 'none'}; layer statistics: {report}")
        if self.train_config.nan_policy == "stop":
            raise NonFiniteLossError(message + ". Set --train.nan_policy skip to drop such batches instead.")
        if self._skip_snapshot is not None:  # the forward already wrote this batch into the memory: undo it
            self.model.load_fast_weight_state(self._skip_snapshot)
        self.skipped_batches += 1
        self.print(f"[fwpkm] skipping batch: {message}")
        self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)
        self._check_skip_limit()
        return None

    def _check_skip_limit(self) -> None:
        fraction = self.train_config.max_skipped_fraction
        max_steps = int(getattr(self.trainer, "max_steps", -1) or -1)
        seen = self.skipped_batches + self.global_step
        allowed = max(1, int(fraction * (max_steps if max_steps > 0 else seen)))
        if self.skipped_batches > allowed:
            raise NonFiniteLossError(
                f"train.max_skipped_fraction={fraction}: {self.skipped_batches} of {seen} batches had a non-finite "
                f"loss or gradient, more than the {allowed} allowed ({fraction} x trainer.max_steps={max_steps}, "
                "at least 1); the run stops. Lower optim.lr, or raise train.max_skipped_fraction")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.optim_config.grad_clip
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return
        max_norm = clip if clip else float("inf")
        if gradient_clip_algorithm == "value" and clip:
            torch.nn.utils.clip_grad_value_(params, clip)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        elif _is_fsdp(self.trainer):  # sharded gradients: FSDP computes the global norm itself
            norm = self.trainer.strategy.model.clip_grad_norm_(max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if str(self.trainer.precision).startswith("16"):
            return  # fp16 loss scaling: inf gradients are expected and the GradScaler skips those steps
        if not torch.isfinite(norm):
            self._non_finite("gradient norm", norm, {})
            for p in self.parameters():  # nan_policy=skip: AdamW leaves parameters without gradient alone
                p.grad = None
            return
        self._grad_norm = norm.detach()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._skip_snapshot = None
        if self._step_start is not None and outputs is not None:
            elapsed = max(time.perf_counter() - self._step_start, 1e-9)
            tokens = batch["input_ids"].numel() * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / elapsed, on_step=True, on_epoch=False, prog_bar=True,
                     batch_size=batch["input_ids"].shape[0])
        if self._grad_norm is not None:
            self.log("train/grad_norm", self._grad_norm, on_step=True, on_epoch=False)
            self._grad_norm = None

    def _log_train_step(self, loss: Tensor, stats: dict, fa_to_swa: bool, batch_size: int) -> None:
        metrics = {
            "train/loss": loss,
            "train/ppl": torch.exp(loss.clamp(max=50.0)),
            "train/lr": torch.tensor(self._current_lr()),
            "train/fa_to_swa": torch.tensor(float(fa_to_swa)),
        }
        for layer, values in stats.items():
            for name, value in values.items():
                metrics[f"mem/L{layer}/{name}"] = value
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        metrics.pop("train/loss")
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size)

    def _current_lr(self) -> float:
        try:
            return float(self.trainer.optimizers[0].param_groups[0]["lr"])
        except (AttributeError, IndexError, RuntimeError):
            return float("nan")

    # ----------------------------------------------------------------- fast weights across ranks

    def _sync_fast_weights(self) -> None:
        """DDP policy "mean": average every fast-weight buffer over the ranks (see module docstring)."""
        if self.train_config.ddp_fast_weights != "mean" or not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size()
        if world == 1:
            return
        buffers = [b for m in self.model.fast_weight_memories().values() for b in m.buffers()]
        if not buffers:
            return
        flat = torch.cat([b.detach().reshape(-1).float() for b in buffers])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        with torch.no_grad():
            for b in buffers:
                n = b.numel()
                b.copy_(flat[offset:offset + n].view_as(b).to(b.dtype))
                offset += n

    # ----------------------------------------------------------------- validation

    def on_validation_epoch_start(self) -> None:
        self._val_state = self.model.fast_weight_state()
        self._val_loader = 0

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx != self._val_loader:  # every validation set starts from the training state
            self.model.load_fast_weight_state(self._val_state)
            self._val_loader = dataloader_idx
        # The memory writes while evaluating, and its key update takes an (inner) autograd gradient,
        # which inference mode forbids: run in plain no-grad mode on normal (non-inference) tensors.
        with torch.inference_mode(False), torch.no_grad():
            input_ids, labels = batch["input_ids"].clone(), batch["labels"].clone()
            out = self.model(input_ids, labels=labels)
            self.val_ppl[dataloader_idx].update(out.logits.float(), labels)
            self.val_acc[dataloader_idx].update(out.logits.argmax(-1).flatten(), labels.flatten())

    def on_validation_epoch_end(self) -> None:
        for i, (name, metric, accuracy) in enumerate(zip(self.val_names, self.val_ppl, self.val_acc)):
            if not metric.update_called:
                continue
            with torch.inference_mode(False):  # keep the metric's states normal tensors (see validation_step)
                ppl, acc = metric.compute(), accuracy.compute()
                metric.reset()
                accuracy.reset()
            self.log(f"val/{name}/ppl", ppl, add_dataloader_idx=False)
            self.log(f"val/{name}/loss", torch.log(ppl), add_dataloader_idx=False)
            self.log(f"val/{name}/acc", acc, add_dataloader_idx=False)
            if i == 0:
                self.log("val/ppl", ppl, prog_bar=True, add_dataloader_idx=False)
                self.log("val/acc", acc, add_dataloader_idx=False)
        self._restore_after_eval()

    def on_validation_end(self) -> None:
        self._restore_after_eval()  # also when the epoch ended early

    def on_test_epoch_start(self) -> None:
        self._val_state = self.model.fast_weight_state()

    def on_test_epoch_end(self) -> None:
        self._restore_after_eval()

    def _restore_after_eval(self) -> None:
        if self._val_state is not None:
            self.model.load_fast_weight_state(self._val_state)
            self._val_state = None

    # ----------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.model_config.to_dict(),
            "preset": self.preset,
            "rng": _rng_state(),
            "skipped_batches": self.skipped_batches,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_matches(checkpoint, self, source="the checkpoint")
        ours = checkpoint[CHECKPOINT_KEY]
        self.skipped_batches = int(ours.get("skipped_batches", 0))
        if ours.get("rng"):
            _set_rng_state(ours["rng"])


# --------------------------------------------------------------------------- helpers


def weighted_loss(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """Next-token cross-entropy with a weight per label, summed and divided by the labels that count (-100
    carry none): with every weight 1 the model's own mean loss."""
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                           reduction="none")
    counted = labels.flatten() != -100
    return (ce * weights.flatten().to(ce.dtype))[counted].sum() / counted.sum().clamp_min(1)


QUERY_TEMPERATURE = 0.1  # of the query loss's softmax over positions (cosines in [-1, 1])


def query_loss(memory_outputs: dict, pairs: Tensor, row_weights: Tensor) -> Tensor:
    """The weighted mean over memory layers and (reader, source) pairs of -log softmax_t(cos(q_reader, q_t) / tau)
    at t = source, over the positions t before the reader in its row: the loss of finding, by its query, the
    position whose write holds the token the reader must read. ``pairs`` [B, P, 2] (-1: none), ``row_weights``
    [B, 1]; 0 when no row has a pair."""
    b, k = (pairs[..., 0] >= 0).nonzero(as_tuple=True)
    readers, sources = pairs[b, k, 0], pairs[b, k, 1]
    weights = row_weights[b, 0]
    layers = [mo.queries for mo in memory_outputs.values() if mo.queries is not None]
    if not len(b) or not layers:
        return row_weights.new_zeros(())
    total = 0.0
    for queries in layers:
        q = torch.nn.functional.normalize(queries.to(compute_dtype(queries.dtype)), dim=-1)
        logits = torch.einsum("nd,ntd->nt", q[b, readers], q[b]) / QUERY_TEMPERATURE
        before = torch.arange(q.shape[1], device=q.device)[None, :] < readers[:, None]
        logits = logits.masked_fill(~before, float("-inf"))
        nll = torch.nn.functional.cross_entropy(logits, sources, reduction="none")
        total = total + (weights.to(nll.dtype) * nll).sum() / len(b)
    return total / len(layers)


def memory_stats(out) -> dict:
    """Layer -> {stat: scalar tensor}: the memory's own statistics plus the gate mean."""
    stats = {}
    for layer, mo in out.memory.items():
        values = {k: torch.as_tensor(v).detach().float() for k, v in mo.stats.items()}
        if mo.gates is not None:
            values["gate_mean"] = mo.gates.detach().float().mean()
        stats[layer] = values
    return stats


def _format_stats(stats: dict) -> str:
    if not stats:
        return "{}"
    return "; ".join(f"layer {layer}: " + ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(values.items()))
                     for layer, values in sorted(stats.items()))


def _is_fsdp(trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(getattr(trainer, "strategy", None), FSDPStrategy)


def _disable_ddp_buffer_broadcast(trainer) -> None:
    """DDP would copy rank 0's buffers (the fast weights) over every rank before each forward."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, DDPStrategy):
        strategy._ddp_kwargs["broadcast_buffers"] = False


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    try:
        random.setstate(_as_tuple(state["python"]))
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        pass  # RNG states are a courtesy: training itself draws no global randomness


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def config_differences(saved: dict, current: dict, limit: int = 12) -> list[str]:
    a, b = dict(leaves(saved)), dict(leaves(current))
    diffs = [f"{k}: checkpoint={a.get(k, MISSING)!r} vs now={b.get(k, MISSING)!r}" for k in changed_paths(a, b)]
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


def check_checkpoint_matches(checkpoint: Any, module: FwPKMLitModule, source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``checkpoint`` was written for this model."""
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{source} is not a Lightning checkpoint (no 'state_dict')")
    ours = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(ours, dict) or "model_config" not in ours:
        raise CheckpointError(f"{source} was not written by fwpkm training (no '{CHECKPOINT_KEY}' section)")
    if ours.get("format", 0) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source} has format {ours.get('format')}, newer than this code ({CHECKPOINT_FORMAT})")
    diffs = config_differences(ours["model_config"], module.model_config.to_dict())
    if diffs:
        raise CheckpointError(f"{source} holds a different model than the one configured; differences: "
                              + "; ".join(diffs)
                              + ". Use the run's original options, or a new --run_dir for a new model")
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = [f"{k}: checkpoint {found[k]} vs model {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{source} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                              f"wrong shapes {wrong[:8]}")


def load_checkpoint(path: str, map_location: Union[str, torch.device] = "cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with a clear :class:`CheckpointError` on failure."""
    import os

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        try:  # memory-mapped: checking a large checkpoint costs no extra copy
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # zip errors, unpickling errors, truncated files ...
        raise CheckpointError(
            f"checkpoint {path!r} cannot be loaded safely (torch.load weights_only=True failed: "
            f"{type(err).__name__}: {err}). It is corrupt (e.g. the process died while writing it) or not a "
            "checkpoint of this project; delete it to start over or resume from another one") from err


def load_model(path: str, map_location: Union[str, torch.device] = "cpu") -> tuple[HybridLM, dict]:
    """The trained :class:`HybridLM` of a training checkpoint (weights and fast weights) and the checkpoint's
    ``fwpkm`` section (``model_config``, ``preset``), loaded with ``weights_only=True``."""
    checkpoint = load_checkpoint(path, map_location)
    ours = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(ours, dict) or "model_config" not in ours or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path!r} was not written by fwpkm training")
    model = HybridLM(ModelConfig.from_dict(ours["model_config"]))
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path!r} does not fit its own model config: {err}") from err
    return model, {k: v for k, v in ours.items() if k != "rng"}


def model_costs(run_dir: Path, context: int) -> dict:
    """``model/params`` (trainable, the model built on the meta device from ``model_config.yaml``),
    ``model/flops_per_token`` and ``model/state_size`` at ``context`` tokens (:mod:`fwpkm.costs`)."""
    import yaml

    from fwpkm.costs import flops_per_token, state_size

    path = Path(run_dir) / "model_config.yaml"
    if not path.is_file():
        return {}
    config = ModelConfig.from_dict(yaml.safe_load(path.read_text()))
    with torch.device("meta"):
        model = HybridLM(config)
    return {"model/params": float(sum(p.numel() for p in model.parameters())),
            "model/flops_per_token": flops_per_token(config, context),
            "model/state_size": float(state_size(config, context))}
