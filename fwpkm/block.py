"""The fast-weight block inside a decoder layer (spec section 2)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BlockConfig
from .fastweights import FastWeightOutput, FastWeightStream
from .fwmlp import FwMLPMemory
from .layers import RMSNorm
from .memory import FwPKMMemory


class FastWeightBlock(nn.Module):
    """h -> h + Linear(RMSNorm(o)), o = gated memory read plus the residual value path."""

    def __init__(self, d_model: int, config: BlockConfig, norm_eps: float = 1e-6):
        super().__init__()
        self.config = c = config
        self.q_norm, self.q_proj = RMSNorm(d_model, norm_eps), nn.Linear(d_model, c.k_dim)
        self.v_norm, self.v_proj = RMSNorm(d_model, norm_eps), nn.Linear(d_model, c.v_dim)
        self.uses_gate = c.out_fuse_gate or c.weight_loss_with_gates
        if self.uses_gate:
            self.g_norm, self.g_proj = RMSNorm(d_model, norm_eps), nn.Linear(d_model, c.gate_outputs)
        self.o_norm, self.o_proj = RMSNorm(c.v_dim, norm_eps), nn.Linear(c.v_dim, d_model, bias=False)
        self.memory = FwPKMMemory(c.memory) if c.kind == "fwpkm" else FwMLPMemory(c.fwmlp)

    def forward(self, h: Tensor, mask: Optional[Tensor] = None, *, stream: Optional[FastWeightStream] = None,
                chunk_size: Optional[int] = None) -> tuple[Tensor, FastWeightOutput]:
        c = self.config
        q = self._compress(self.q_proj(self.q_norm(h)))
        v = self._normalise_target(self.v_proj(self.v_norm(h)))
        g = torch.sigmoid(self.g_proj(self.g_norm(h)).mean(-1)) if self.uses_gate else None
        mo = self.memory(q, v, g if c.weight_loss_with_gates else None, mask, chunk_size=chunk_size, stream=stream)
        o = mo.output
        if c.out_fuse_gate:
            o = g.unsqueeze(-1) * o + ((1 - g).unsqueeze(-1) * v if c.residual_value else 0.0)
        elif c.residual_value:
            o = o + v
        mo.gates = None if g is None else g.detach()
        mo.queries = q
        return h + self.o_proj(self.o_norm(o)), mo

    def new_stream(self, chunk_size: Optional[int] = None) -> FastWeightStream:
        return self.memory.new_stream(chunk_size)

    def _compress(self, q: Tensor) -> Tensor:
        mode = self.config.query_compression
        if mode == "none":
            return q
        # FwPKM compresses each head's two halves separately; FwMLP its whole query
        halves = q.unflatten(-1, (self.config.memory.heads, 2, -1) if self.config.kind == "fwpkm" else (1, 1, -1))
        halves = F.normalize(halves, dim=-1) if mode == "l2norm" else halves - halves.mean(-1, keepdim=True)
        return halves.flatten(-3)

    def _normalise_target(self, v: Tensor) -> Tensor:
        mode = self.config.target_norm
        if mode == "zero_mean":
            return (v - v.mean(-1, keepdim=True)) / (v.std(-1, keepdim=True) + 1e-6)
        if mode == "l2norm":
            return F.normalize(v, dim=-1)
        return v
