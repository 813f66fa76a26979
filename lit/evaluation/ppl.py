"""Perplexity in fixed windows and streamed over a long input, with loss by token position."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fwpkm import HybridLM

from .common import device_of, preserved_fast_weights, stream


@dataclass
class PerplexityResult:
    mode: str  # windowed | streamed
    tokens: int
    loss: float
    position_loss: Tensor  # [positions] mean loss at each token position
    position_count: Tensor  # [positions] tokens averaged at each position

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    def position_table(self, n_bins: int = 64) -> list[dict]:
        """Loss by position in up to ``n_bins`` equal bins (rows: start, end, loss, tokens)."""
        n = len(self.position_loss)
        edges = torch.linspace(0, n, min(n_bins, n) + 1).long().tolist()
        rows = []
        for a, b in zip(edges, edges[1:]):
            count = self.position_count[a:b].sum()
            if count > 0:
                loss = (self.position_loss[a:b] * self.position_count[a:b]).sum() / count
                rows.append({"start": a, "end": b, "loss": float(loss), "tokens": int(count)})
        return rows


@torch.no_grad()
def windowed_perplexity(model: HybridLM, tokens: Tensor, window: int, batch_size: int = 8,
                        reset_memory: bool = True) -> PerplexityResult:
    """Non-overlapping windows of ``window`` predicted tokens, each read in one call.

    With ``reset_memory`` every window starts from the model's fast-weight state at the
    start of the evaluation (windows are independent documents); else the memory carries over.
    """
    model.eval()
    seqs = _windows(tokens, window + 1).to(device_of(model))
    loss_sum, count = torch.zeros(window), torch.zeros(window)
    with preserved_fast_weights(model) as start_state:
        for batch in seqs.split(batch_size):
            if reset_memory:
                model.load_fast_weight_state(start_state)
            logits = model(batch[:, :-1]).logits
            nll = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none").cpu()
            loss_sum += nll.sum(0)
            count += nll.shape[0]
    return _result("windowed", loss_sum, count)


@torch.no_grad()
def streamed_perplexity(model: HybridLM, tokens: Tensor, segment_len: int = 512, n_streams: int = 1,
                        chunk_size: int | None = None) -> PerplexityResult:
    """Read ``tokens`` as ``n_streams`` long sequences fed ``segment_len`` tokens at a time,
    carrying attention caches, Gated DeltaNet state and fast-weight streams across segments.
    Loss by position is the long-context signal: it should fall with position when memory helps."""
    model.eval()
    length = (len(tokens) - 1) // n_streams
    if length < 1:
        raise ValueError(f"{len(tokens)} tokens are too few for {n_streams} streams")
    seqs = _windows(tokens, length + 1)[:n_streams].to(device_of(model))
    loss_sum, count = torch.zeros(length), torch.zeros(length)
    with preserved_fast_weights(model):
        _, run = stream(model, seqs[:, :-1], segment_len, chunk_size=chunk_size)
        logits = torch.cat(run.logits, dim=1)
        nll = F.cross_entropy(logits.transpose(1, 2), seqs[:, 1:], reduction="none").cpu()
    loss_sum += nll.sum(0)
    count += nll.shape[0]
    return _result("streamed", loss_sum, count)


def _windows(tokens: Tensor, size: int) -> Tensor:
    n = len(tokens) // size
    if n == 0:
        raise ValueError(f"need at least {size} tokens for one window; got {len(tokens)}")
    return tokens[: n * size].view(n, size).long()


def _result(mode: str, loss_sum: Tensor, count: Tensor) -> PerplexityResult:
    return PerplexityResult(mode, int(count.sum()), float(loss_sum.sum() / count.sum()), loss_sum / count, count)
