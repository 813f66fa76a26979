"""Perplexity in fixed windows and streamed over a long input, with loss by token position."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

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
        return self.bins(torch.linspace(0, n, min(n_bins, n) + 1).long().tolist())

    def bins(self, edges: list[int]) -> list[dict]:
        """Loss of the positions between consecutive ``edges`` (rows: start, end, loss, tokens; empty bins left out)."""
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


# --------------------------------------------------------------------------- a finished run


@dataclass
class PositionConfig:
    """Streamed loss by token position over a text source's held-out documents (a grid's ``eval.ppl``)."""

    source: str = "embedded"  # a text source; its documents held out by the run's data.val_fraction and seed
    stream_len: int = 8192  # tokens per stream
    streams: int = 0  # parallel streams (0: as many as the held-out text fills)
    segment_len: int = 1024  # tokens fed per call
    first_bucket: int = 32  # positions [0, first_bucket), then buckets doubling in length

    def __post_init__(self):
        for name in ("stream_len", "segment_len", "first_bucket"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ppl.{name}={getattr(self, name)!r} must be >= 1")
        if int(self.streams) < 0:
            raise ValueError(f"ppl.streams={self.streams!r} must be >= 0 (0: as many as fit)")


def position_buckets(result: PerplexityResult, first: int) -> list[dict]:
    """Loss in buckets of position [0, first), [first, 2 first), [2 first, 4 first), ...: the attention
    window's positions apart from the ones only a memory can reach."""
    edges, n = [0, min(first, len(result.position_loss))], len(result.position_loss)
    while edges[-1] < n:
        edges.append(min(2 * edges[-1], n))
    return result.bins(edges)


def evaluate_run(run_dir, options: dict, config: dict, gpu=None) -> tuple[dict, Path]:
    """Streamed loss by position of a run's final checkpoint on held-out plain text: (metrics
    ``ppl/loss/P<start>`` and ``ppl/tokens/P<start>`` per bucket and ``ppl/streamed_loss``, ``ppl.csv``)."""
    import csv

    from lit.data import DataConfig, join_tokens, load_documents, parse_source, split_documents, tokenize
    from lit.module import load_model
    from lit.tokenizer import load_tokenizer

    from .common import run_device

    cfg = PositionConfig(**options)
    data = DataConfig.from_dict({k: v for k, v in (config.get("data") or {}).items() if k in DataConfig.__dataclass_fields__})
    spec = parse_source(cfg.source, "eval.ppl.source")
    if not spec.is_text:
        raise ValueError(f"eval.ppl.source={cfg.source!r} must be a text source, e.g. 'embedded'")
    documents = load_documents(spec, data, "eval.ppl.source")
    held_out = split_documents(documents, data.val_fraction, data.seed)[1] if data.val_fraction > 0 else documents
    tokenizer = load_tokenizer(data.tokenizer)
    ids = join_tokens(tokenize(held_out, tokenizer), [tokenizer.eos_id])
    streams = cfg.streams or len(ids) // (cfg.stream_len + 1)
    if streams < 1 or len(ids) < streams * (cfg.stream_len + 1):
        raise ValueError(f"eval.ppl: the held-out text of {cfg.source!r} has {len(ids)} tokens, fewer than "
                         f"{max(streams, 1)} stream(s) of ppl.stream_len={cfg.stream_len}")
    device = run_device(config, gpu)
    model, _ = load_model(str(Path(run_dir) / "checkpoints" / "last.ckpt"), map_location=device)
    tokens = torch.as_tensor(ids[: streams * (cfg.stream_len + 1)])
    result = streamed_perplexity(model.to(device), tokens, cfg.segment_len, n_streams=streams)
    rows = position_buckets(result, cfg.first_bucket)
    metrics = {"ppl/streamed_loss": result.loss, "ppl/streams": float(streams)}
    for row in rows:
        metrics[f"ppl/loss/P{row['start']}"], metrics[f"ppl/tokens/P{row['start']}"] = row["loss"], float(row["tokens"])
    path = Path(run_dir) / "ppl.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return metrics, path
