"""Shared pieces of the evaluations: streaming a long input through the model and
keeping the fast-weight state of the checkpoint intact between samples."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import Tensor

from fwpkm import HybridLM


@dataclass
class StreamedRun:
    """What a streamed pass produced: logits (when kept) and every memory layer's reads."""

    logits: list = field(default_factory=list)  # per segment [B, t, vocab]
    indices: dict = field(default_factory=dict)  # layer -> list of [B, t, H, k]
    weights: dict = field(default_factory=dict)
    gates: dict = field(default_factory=dict)  # layer -> list of [B, t]
    stats: dict = field(default_factory=dict)  # layer -> list of per-call stats dicts

    def cat(self, name: str, layer: int) -> Optional[Tensor]:
        parts = getattr(self, name).get(layer, [])
        return torch.cat(parts, dim=1) if parts and parts[0] is not None else None


@torch.no_grad()
def stream(model: HybridLM, ids: Tensor, segment_len: int, cache=None, keep_logits: bool = True,
           chunk_size: Optional[int] = None, record: bool = False, run: Optional[StreamedRun] = None):
    """Feed ``ids`` [B, T] through ``cache`` (a new one when None) in segments.

    Returns (cache, run). The fast-weight tail stays pending in the cache: call
    ``model.flush(cache)`` to write it.
    """
    if segment_len <= 0:
        raise ValueError(f"segment_len={segment_len} must be > 0")
    cache = model.new_cache(chunk_size) if cache is None else cache
    run = run or StreamedRun()
    for start in range(0, ids.shape[1], segment_len):
        out = model(ids[:, start:start + segment_len], cache=cache)
        if keep_logits:
            run.logits.append(out.logits.float())
        for layer, mo in out.memory.items():
            run.stats.setdefault(layer, []).append(mo.stats)
            if record:
                run.indices.setdefault(layer, []).append(mo.indices)
                run.weights.setdefault(layer, []).append(mo.weights)
                run.gates.setdefault(layer, []).append(mo.gates)
    return cache, run


@contextlib.contextmanager
def preserved_fast_weights(model: HybridLM) -> Iterator[dict]:
    """Restore the model's fast weights on exit: evaluations never change the checkpoint's state."""
    saved = model.fast_weight_state()
    try:
        yield saved
    finally:
        model.load_fast_weight_state(saved)


def device_of(model: HybridLM) -> torch.device:
    return next(model.parameters()).device


def run_device(config: dict, gpu: Optional[str] = None) -> torch.device:
    """Where to evaluate a run: the ``gpu`` a grid runner gave it, else CUDA when its trainer could use it."""
    if gpu is not None:  # the runner sees every GPU of --gpus: the index is the logical one
        return torch.device("cuda", int(gpu)) if str(gpu).isdigit() else torch.device("cuda")
    accelerator = str((config.get("trainer") or {}).get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
