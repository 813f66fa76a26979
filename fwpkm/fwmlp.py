"""Dense fast-weight SwiGLU MLP (spec section 3): the baseline that shows sparsity matters.

Same chunking, lookahead and gate weighting as FwPKM; the plain gradient of the
mean memorisation loss updates every weight (no N_read scaling, no addressing loss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import FwMLPConfig
from .fastweights import ChunkedFastWeights, Segment

NAMES = ("w_gate", "b_gate", "w_up", "b_up", "w_down", "b_down")


class FwMLPMemory(ChunkedFastWeights):
    def __init__(self, config: FwMLPConfig):
        super().__init__()
        self.config = config
        c = self.config
        self.chunk_size, self.lookahead = c.chunk_size, c.lookahead
        shapes = {"w_gate": (c.hidden, c.k_dim), "b_gate": (c.hidden,), "w_up": (c.hidden, c.k_dim),
                  "b_up": (c.hidden,), "w_down": (c.v_dim, c.hidden), "b_down": (c.v_dim,)}
        for name, shape in shapes.items():
            self.register_buffer(name, torch.empty(shape))
        self.reset_state()

    def reset_state(self) -> None:
        with torch.no_grad():
            for name in NAMES:
                t = getattr(self, name)
                if name.startswith("b_"):
                    t.zero_()
                else:
                    t.normal_(0.0, 1.0 / math.sqrt(t.shape[1]))

    @property
    def state_dtype(self) -> torch.dtype:
        return self.w_up.dtype

    def _apply(self, fn, recurse=True):
        state = {name: getattr(self, name) for name in NAMES}
        super()._apply(fn, recurse)
        for name, old in state.items():
            if getattr(self, name).dtype in (torch.float16, torch.bfloat16):
                setattr(self, name, old.to(device=getattr(self, name).device))
        return self

    def _begin(self, graph: bool) -> dict:
        return {name: getattr(self, name).detach().clone().requires_grad_(True) for name in NAMES}

    def _read(self, weights: dict, q: Tensor, graph: bool):
        with torch.enable_grad():  # the inner gradient needs a graph even in evaluation
            if not graph:
                q = q.detach()
            w = weights
            hidden = F.silu(F.linear(q, w["w_gate"], w["b_gate"])) * F.linear(q, w["w_up"], w["b_up"])
            return _Read(F.linear(hidden, w["w_down"], w["b_down"]))

    def _write(self, weights: dict, seg: Segment, read, graph: bool) -> dict:
        c = self.config
        P = len(seg) - c.lookahead
        if P <= 0:
            return {}
        with torch.enable_grad():
            e = (read.out[:, :P] - seg.v[:, c.lookahead:]).pow(2).mean(-1)
            if seg.mask is not None:
                e = e * seg.mask[:, :P]
            if seg.gates is not None:
                e = e * seg.gates[:, :P]
            mem_loss = 0.5 * e.mean()
            grads = torch.autograd.grad(mem_loss, [weights[n] for n in NAMES], create_graph=graph)
        norm_sq = 0.0
        for name, grad in zip(NAMES, grads):
            if c.grad_clip:
                grad = grad.clamp(-1.0, 1.0)
            norm_sq = norm_sq + grad.detach().pow(2).sum()
            new = weights[name] - c.lr * (grad + c.weight_decay * weights[name])
            weights[name] = new if graph else new.detach().requires_grad_(True)
        return {"mem_loss": mem_loss.detach(), "grad_norm_values": norm_sq.sqrt()}

    def _commit(self, weights: dict) -> None:
        with torch.no_grad():
            for name in NAMES:
                getattr(self, name).copy_(weights[name])


class _Read:
    def __init__(self, out: Tensor):
        self.out = out
