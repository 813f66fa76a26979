"""Chunked fast-weight memories: the read-then-write loop shared by FwPKM and FwMLP.

A subclass supplies four steps over its own working state (the fast weights
during one call): ``_begin`` builds it from the stored state, ``_read`` reads a
run of tokens, ``_write`` takes one inner SGD step on a complete chunk, and
``_commit`` stores the final state detached. This module owns chunking,
streaming (spec section 1.3) and the contract between the steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch
from torch import Tensor, nn


@dataclass
class Segment:
    """Consecutive tokens of one or more sequences: what a write consumes."""

    q: Tensor  # [B, T, q_dim]
    v: Tensor  # [B, T, v_dim] target values
    gates: Optional[Tensor] = None  # [B, T]
    mask: Optional[Tensor] = None  # [B, T]

    def __len__(self) -> int:
        return self.q.shape[1]

    def slice(self, start: int, stop: int) -> "Segment":
        return Segment(*(None if t is None else t[:, start:stop] for t in self._tensors()))

    def detach(self) -> "Segment":
        return Segment(*(None if t is None else t.detach() for t in self._tensors()))

    def cat(self, other: "Segment") -> "Segment":
        parts = []
        for a, b in zip(self._tensors(), other._tensors()):
            if (a is None) != (b is None):
                raise ValueError("streaming pieces must all pass gates (and mask), or all omit them")
            parts.append(None if a is None else torch.cat([a, b], dim=1))
        return Segment(*parts)

    def _tensors(self):
        return [getattr(self, f.name) for f in fields(self)]


@dataclass
class FastWeightStream:
    """Streaming state: the not-yet-written tail of the current chunk."""

    chunk_size: int
    pending: Optional[Segment] = None
    position: int = 0  # tokens fed so far

    @property
    def pending_len(self) -> int:
        return 0 if self.pending is None else len(self.pending)


@dataclass
class FastWeightOutput:
    output: Tensor  # [B, T, v_dim] reads
    stats: dict = field(default_factory=dict)  # per-call diagnostics, averaged over the chunks written
    indices: Optional[Tensor] = None  # FwPKM: slot ids read [B, T, heads, topk]
    weights: Optional[Tensor] = None  # FwPKM: their weights [B, T, heads, topk]
    gates: Optional[Tensor] = None
    queries: Optional[Tensor] = None  # the block's queries [B, T, q_dim], with their graph (lit's query loss)


class ChunkedFastWeights(nn.Module):
    """Base class: chunked read/write with streaming. Subclasses hold ``self.chunk_size``
    and ``self.lookahead`` and implement ``_begin/_read/_write/_commit``."""

    chunk_size: int
    lookahead: int

    # -- subclass steps -------------------------------------------------------------
    def _begin(self, graph: bool) -> Any:
        raise NotImplementedError

    def _read(self, state: Any, q: Tensor, graph: bool) -> Any:
        """Return an object with ``.out`` [B, T, v_dim] (and optionally ``.indices``/``.weights``)."""
        raise NotImplementedError

    def _write(self, state: Any, seg: Segment, read: Any, graph: bool) -> dict:
        raise NotImplementedError

    def _commit(self, state: Any) -> None:
        raise NotImplementedError

    @property
    def state_dtype(self) -> torch.dtype:
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------
    def new_stream(self, chunk_size: Optional[int] = None) -> FastWeightStream:
        chunk = self._check_chunk(chunk_size)
        return FastWeightStream(chunk_size=chunk)

    def forward(self, q: Tensor, v: Tensor, gates: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                *, chunk_size: Optional[int] = None, stream: Optional[FastWeightStream] = None) -> FastWeightOutput:
        """Read every token, writing each complete chunk after reading it.

        Without ``stream`` this is a one-shot call: the last partial chunk is written
        too (a flush). With ``stream`` the incomplete tail stays pending in it.
        """
        if torch.is_inference_mode_enabled():
            # The inner update needs autograd (the keys' gradient), which inference tensors refuse.
            with torch.inference_mode(False):
                clone = lambda t: None if t is None else t.clone()
                return self.forward(q.clone(), v.clone(), clone(gates), clone(mask), chunk_size=chunk_size,
                                    stream=stream)
        if stream is not None and chunk_size is not None and chunk_size != stream.chunk_size:
            raise ValueError(f"chunk_size={chunk_size} differs from the stream's chunk_size={stream.chunk_size}")
        chunk = stream.chunk_size if stream is not None else self._check_chunk(chunk_size)
        seg = self._as_segment(q, v, gates, mask)
        graph = self.training and torch.is_grad_enabled()
        with torch.autocast(q.device.type, enabled=False):
            state = self._begin(graph)
            pending = None if stream is None else stream.pending
            reads, stats = self._run(state, seg, pending, chunk, graph, final=stream is None)
            self._commit(state)
        if stream is not None:
            stream.pending = reads.pop("pending")
            stream.position += len(seg)
        return self._output(reads, stats, gates, q.dtype, graph)

    def flush(self, stream: FastWeightStream) -> dict:
        """Write the stream's pending partial chunk now; the next token starts a new chunk."""
        if stream.pending is None:
            return {}
        graph = self.training and torch.is_grad_enabled()
        with torch.autocast(stream.pending.q.device.type, enabled=False):
            state = self._begin(graph)
            stats = self._write_pending(state, stream.pending, None, graph)
            self._commit(state)
        stream.pending = None
        return _detached(stats)

    # -- internals ------------------------------------------------------------------
    def _run(self, state, seg: Segment, pending: Optional[Segment], chunk: int, graph: bool, final: bool):
        outs, indices, weights, chunk_stats = [], [], [], []
        pending_read = None  # the read of `pending` when it was read whole, in this call, with this state
        start = 0
        while start < len(seg):
            have = 0 if pending is None else len(pending)
            stop = min(len(seg), start + chunk - have)
            piece = seg.slice(start, stop)
            read = self._read(state, piece.q, graph)
            outs.append(read.out)
            indices.append(getattr(read, "indices", None))
            weights.append(getattr(read, "weights", None))
            pending_read = read if pending is None else None
            pending = piece if pending is None else pending.cat(piece)
            if len(pending) == chunk:
                chunk_stats.append(self._write_pending(state, pending, pending_read, graph))
                pending, pending_read = None, None
            start = stop
        if final and pending is not None:
            chunk_stats.append(self._write_pending(state, pending, pending_read, graph))
            pending = None
        reads = {
            "out": outs,
            "indices": indices,
            "weights": weights,
            "pending": None if pending is None else pending.detach(),
        }
        return reads, _average(chunk_stats)

    def _write_pending(self, state, pending: Segment, read, graph: bool) -> dict:
        if read is None:  # part of the chunk was read in an earlier call: read it again, same state
            read = self._read(state, pending.q, graph)
        return self._write(state, pending, read, graph)

    def _output(self, reads, stats, gates, dtype, graph) -> FastWeightOutput:
        out = torch.cat(reads["out"], dim=1) if reads["out"] else None
        if not graph:
            out = out.detach()
        cat = lambda xs: None if not xs or xs[0] is None else torch.cat(xs, dim=1).detach()
        return FastWeightOutput(output=out.to(dtype), stats=stats, indices=cat(reads["indices"]),
                                weights=cat(reads["weights"]), gates=None if gates is None else gates.detach())

    def _check_chunk(self, chunk_size: Optional[int]) -> int:
        chunk = self.chunk_size if chunk_size is None else int(chunk_size)
        if chunk <= self.lookahead:
            raise ValueError(f"chunk_size={chunk} must be > lookahead={self.lookahead}")
        return chunk

    def _as_segment(self, q, v, gates, mask) -> Segment:
        if q.dim() != 3 or v.dim() != 3 or q.shape[:2] != v.shape[:2]:
            raise ValueError(f"q must be [B, T, q_dim] and v [B, T, v_dim] with equal B, T; got {tuple(q.shape)} "
                             f"and {tuple(v.shape)}")
        for name, t in (("gates", gates), ("mask", mask)):
            if t is not None and t.shape != q.shape[:2]:
                raise ValueError(f"{name} must be [B, T] = {tuple(q.shape[:2])}; got {tuple(t.shape)}")
        dt = self.state_dtype
        cast = lambda t: None if t is None else t.to(dt)
        return Segment(q.to(dt), v.to(dt), cast(gates), cast(mask))


def _average(chunk_stats: list[dict]) -> dict:
    chunk_stats = [s for s in chunk_stats if s]  # a chunk no longer than the lookahead writes nothing
    if not chunk_stats:
        return {}
    keys = chunk_stats[0].keys()
    return {k: torch.stack([torch.as_tensor(s[k]).detach().float() for s in chunk_stats]).mean() for k in keys}


def _detached(stats: dict) -> dict:
    return {k: torch.as_tensor(v).detach() for k, v in stats.items()}
