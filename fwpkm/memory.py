"""The FwPKM memory core (spec section 1): sparse product-key reads and chunk-level
gradient-descent writes, with meta-gradients through every write in training.

Sparse by construction: during one call the value table is the stored table
(never part of the autograd graph) plus one small delta per written chunk that
covers only the rows the chunk read. A read gathers its rows from both, so a
chunk's time and memory grow with the rows it reads, not with the number of slots.
The meta-gradient through earlier writes is sparse as well: when a chunk reads back few
rows that earlier chunks wrote, it differentiates through those rows' writes only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MemoryConfig
from .fastweights import ChunkedFastWeights, Segment
from kernels import ops


# Below this fraction of a table's rows, a graph through some of its rows is kept apart from the
# table's values (a gradient of those rows only); above it one dense [rows, dv] gradient is cheaper.
SPARSE_BELOW = 1 / 8


@dataclass
class RowUpdate:
    """One chunk's update of the rows it read: ``delta`` [U, dv] for the sorted unique ``rows`` [U].

    ``recipe`` (w, x, idx, row_scale), when given, is how ``delta`` was made,
    ``scatter_rows(w, x, idx, U, row_scale)``: a later chunk that reads a few of these rows
    then differentiates through those rows' writes only, never through all of ``delta``."""

    rows: Tensor
    delta: Tensor
    recipe: Optional[tuple] = None

    def at(self, sel: Tensor, backend: str) -> Tensor:
        if self.recipe is None or len(sel) >= SPARSE_BELOW * len(self.rows):
            return ops.gather_rows(self.delta, sel, backend)
        return ops.scatter_rows_at(*self.recipe, sel, self.delta, backend)


@dataclass
class SparseValues:
    """theta_c's value table: decay^c * base + sum_j decay^(c-1-j) * scatter(rows_j, delta_j).

    With a graph the deltas stay separate (they are graph tensors) until ``commit``. Without
    one (``immediate``) each delta is added to ``base`` in place as it is made, so a long
    no-graph call holds the table once plus one chunk; weight decay is then kept as a lazy
    factor ``scale`` (theta = scale * base) so that a write touches only the rows it writes.
    """

    base: Tensor  # [N, dv] the stored table; never in the graph
    decay: float  # 1 - lr * weight_decay
    deltas: list = field(default_factory=list)  # [RowUpdate]
    immediate: bool = False
    backend: str = "auto"
    scale: float = 1.0  # immediate mode only

    def rows(self, urows: Tensor, split: bool = False) -> tuple[Tensor, list]:
        """theta_c[urows] for sorted unique row ids: ([U, dv], updates).

        The table is differentiable w.r.t. the deltas and ``updates`` is empty; or, with
        ``split`` when earlier chunks wrote few of these rows, the table has no graph and
        ``updates`` lists its graph apart: (hit, upd), the rows ``hit`` of the table that chunk
        j wrote and their differentiable updates ``upd`` [len(hit), dv]. A read that then
        differentiates the table only at ``hit`` never forms a [U, dv] gradient."""
        rows = self.base.index_select(0, urows)  # a copy: later in-place writes to base do not reach it
        factor = self.scale if self.immediate else self.decay ** len(self.deltas)
        if factor != 1.0:
            rows.mul_(factor)
        updates = list(self._updates(urows))
        split = split and sum(len(hit) for hit, _ in updates) < SPARSE_BELOW * len(urows)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not split):
            for hit, upd in updates:
                rows.index_add_(0, hit, upd)  # in place: rows is a fresh tensor nothing has saved
        return rows, (updates if split else [])

    def _updates(self, urows: Tensor):
        """(positions in urows that delta j wrote, those rows of delta j times its decay) per j."""
        c = len(self.deltas)
        for j, update in enumerate(self.deltas):
            pos = torch.searchsorted(update.rows, urows).clamp_max(len(update.rows) - 1)
            hit = (update.rows[pos] == urows).nonzero().squeeze(-1)
            if len(hit):
                upd = update.at(pos[hit], self.backend)
                if self.decay != 1.0:
                    upd = upd * self.decay ** (c - 1 - j)
                yield hit, upd

    def add(self, urows: Tensor, delta: Tensor, recipe: Optional[tuple] = None) -> None:
        if not self.immediate:
            self.deltas.append(RowUpdate(urows, delta, recipe))
            return
        with torch.no_grad():
            if self.decay != 1.0:
                self.scale *= self.decay
                if self.scale < 1e-3:  # fold the factor in now and then (O(N), rare)
                    self._fold()
            self.base.index_add_(0, urows, delta.detach() if self.scale == 1.0 else delta.detach() / self.scale)

    def _fold(self) -> None:
        if self.scale != 1.0:
            self.base.mul_(self.scale)
            self.scale = 1.0

    def commit(self) -> None:
        with torch.no_grad():
            if self.immediate:
                self._fold()
                return
            c = len(self.deltas)
            if self.decay != 1.0:
                self.base.mul_(self.decay**c)
            for j, update in enumerate(self.deltas):
                self.base.index_add_(0, update.rows, update.delta.detach(), alpha=self.decay ** (c - 1 - j))


@dataclass
class WorkingState:
    values: SparseValues
    keys: Tensor  # [H, 2, n, dk/2], a graph tensor when keys are updated with a graph
    keys_update: bool


@dataclass
class Read:
    out: Tensor  # [B, T, dv]
    indices: Tensor  # [B, T, H, k] slot ids
    weights: Tensor  # [B, T, H, k]
    top_sub: tuple  # per half: (top-k sub-scores [B,T,H,k], their sub-key ids [B,T,H,k])
    urows: Tensor  # [U] sorted unique slots read
    inverse: Tensor  # [B, T, H, k] position of each read slot in urows
    n_read: Tensor  # [U] reads of each unique slot (N_read)
    out_for_keys: Optional[Tensor] = None  # no graph: ``out`` with the graph to the keys, for their update


class FwPKMMemory(ChunkedFastWeights):
    """Fast-weight product-key memory. See :class:`fwpkm.config.MemoryConfig` for options."""

    def __init__(self, config: MemoryConfig):
        super().__init__()
        self.config = config
        self.chunk_size = config.chunk_size
        self.lookahead = config.lookahead
        c = config
        self.register_buffer("keys", torch.empty(c.heads, 2, c.n_subkeys, c.k_dim // 2))
        self.register_buffer("values", torch.empty(c.n_slots, c.v_dim))
        self.reset_state()

    def reset_state(self) -> None:
        """Re-initialise the fast weights (spec 1: uniform keys, normal values)."""
        c = self.config
        with torch.no_grad():
            bound = 1.0 / math.sqrt(c.k_dim)
            self.keys.uniform_(-bound, bound)
            self.values.normal_(0.0, c.v_dim**-0.5)

    @property
    def state_dtype(self) -> torch.dtype:
        return self.values.dtype

    def _apply(self, fn, recurse=True):
        # The fast weights stay float32 when the model is cast to half precision.
        state = {name: getattr(self, name) for name in ("keys", "values")}
        super()._apply(fn, recurse)
        for name, old in state.items():
            new = getattr(self, name)
            if new.dtype in (torch.float16, torch.bfloat16):
                setattr(self, name, old.to(device=new.device))
        return self

    def extra_repr(self) -> str:
        c = self.config
        train_k = f", train_topk={c.train_topk}" if c.train_topk else ""
        return (f"heads={c.heads}, topk={c.topk}{train_k}, slots={c.n_subkeys}^2, k_dim={c.k_dim}, v_dim={c.v_dim}, "
                f"chunk={c.chunk_size}, lookahead={c.lookahead}, score={c.score}, mse={c.mse}")

    # -- the four steps -------------------------------------------------------------
    def _begin(self, graph: bool) -> WorkingState:
        c = self.config
        keys_update = c.uses_addr_loss or not c.grad_to_values_only
        keys = self.keys
        if keys_update:
            keys = self.keys.detach().clone().requires_grad_(True)
        values = SparseValues(self.values, 1.0 - c.lr * c.weight_decay, immediate=not graph, backend=c.backend)
        return WorkingState(values, keys, keys_update)

    def _read(self, state: WorkingState, q: Tensor, graph: bool) -> Read:
        c = self.config
        B, T, _ = q.shape
        if not graph:
            q = q.detach()
        with torch.set_grad_enabled(graph or state.keys_update):
            qh = q.view(B, T, c.heads, c.k_dim)
            k = c.reads_per_head(graph)
            top_sub, scores, indices = ops.address(qh, state.keys, k, c.score, backend=c.backend)
            weights = self._normalise(scores)
            # only the rows read are gathered: theta_c[unique slots], then the weighted read
            urows, inverse, n_read = torch.unique(indices.reshape(-1), return_inverse=True, return_counts=True)
            hk = c.heads * k
            # without a graph, the read needs one only when the keys learn from mem_loss, and only
            # until the write: the caller keeps detached reads, so a long call holds no graph
            mem_loss_to_keys = state.keys_update and not c.grad_to_values_only
            w = weights if graph or mem_loss_to_keys else weights.detach()
            w, inv = w.reshape(B * T, hk), inverse.view(B * T, hk)
            # unless the read is differentiated twice, the table's graph is needed only at the
            # rows earlier chunks wrote: it may be read there apart (no [U, dv] gradient)
            table, updates = state.values.rows(urows, split=graph and not mem_loss_to_keys)
            out = ops.weighted_gather(w, table, inv, backend=c.backend)
            out = _read_updates(out, w, inv, len(urows), updates, c.backend).view(B, T, -1)
        inverse = inverse.view(B, T, c.heads, k)
        if graph:
            return Read(out, indices, weights, top_sub, urows, inverse, n_read)
        return Read(out.detach(), indices, weights.detach(), top_sub, urows, inverse, n_read,
                    out_for_keys=out if mem_loss_to_keys else None)

    def _write(self, state: WorkingState, seg: Segment, read: Read, graph: bool) -> dict:
        c = self.config
        B, T = seg.q.shape[:2]
        P = T - c.lookahead  # written pairs per sequence
        if P <= 0:
            return {}
        with torch.set_grad_enabled(graph or state.keys_update):
            coef = self._loss_coefficients(seg, P)
            out = read.out if read.out_for_keys is None else read.out_for_keys
            err = out[:, :P] - seg.v[:, c.lookahead:]
            mem_loss = 0.5 * (err.pow(2).mean(-1) * coef).mean()
            addr_loss = self._addressing_loss(read.top_sub) if c.uses_addr_loss else mem_loss.new_zeros(())
        stats = {"mem_loss": mem_loss.detach(), "addr_loss": addr_loss.detach()}
        if state.keys_update:
            stats["grad_norm_keys"] = self._update_keys(state, mem_loss, addr_loss, graph)
        if not graph:
            err, coef, read = err.detach(), coef.detach(), _detach_read(read)
        stats.update(self._update_values(state, seg, read, err, coef, P))
        return stats

    def _commit(self, state: WorkingState) -> None:
        state.values.commit()
        if state.keys_update:
            with torch.no_grad():
                self.keys.copy_(state.keys)

    # -- pieces of the write --------------------------------------------------------
    def _normalise(self, scores: Tensor) -> Tensor:
        c = self.config
        s = scores / c.temperature
        if c.score_fn == "softmax":
            B, T, H, k = s.shape
            return torch.softmax(s.reshape(B, T, H * k), dim=-1).view(B, T, H, k)
        return F.silu(s) if c.score_fn == "silu" else F.relu(s)

    @staticmethod
    def _loss_coefficients(seg: Segment, P: int) -> Tensor:
        coef = seg.q.new_ones(seg.q.shape[0], P)
        if seg.mask is not None:
            coef = coef * seg.mask[:, :P]
        if seg.gates is not None:
            coef = coef * seg.gates[:, :P]
        return coef

    def _addressing_loss(self, top_sub: tuple) -> Tensor:
        """-a * (H(p_bar_1) + H(p_bar_2)): marginal entropy of top-k-softmax addressing."""
        c = self.config
        entropy = 0.0
        for top_scores, top_ids in top_sub:
            probs = torch.softmax(top_scores, dim=-1)
            rows = probs.numel() // probs.shape[-1]
            p_bar = probs.new_zeros(c.n_subkeys).index_add(0, top_ids.reshape(-1), probs.reshape(-1)) / rows
            entropy = entropy - (p_bar * torch.log(p_bar + 1e-8)).sum()
        return -c.addr_loss_weight * entropy

    def _update_keys(self, state: WorkingState, mem_loss: Tensor, addr_loss: Tensor, graph: bool) -> Tensor:
        c = self.config
        with torch.enable_grad():  # the sum needs a graph even under an outer no_grad
            loss = addr_loss if c.grad_to_values_only else mem_loss + addr_loss
        (grad,) = torch.autograd.grad(loss, state.keys, create_graph=graph, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(state.keys)
        if c.grad_clip:
            grad = grad.clamp(-1.0, 1.0)
        new_keys = state.keys - c.lr * (grad + c.weight_decay * state.keys)
        state.keys = new_keys if graph else new_keys.detach().requires_grad_(True)
        return grad.detach().norm()

    def _update_values(self, state: WorkingState, seg: Segment, read: Read, err: Tensor, coef: Tensor,
                       P: int) -> dict:
        """Sparse SGD on the rows read in this chunk (spec 1.2 steps 5-8)."""
        c = self.config
        B, T, H, k = read.indices.shape
        urows, n_read = read.urows, read.n_read
        d_read = err * (coef / (B * P * c.v_dim)).unsqueeze(-1)  # d mem_loss / d read_t, [B, P, dv]
        written = read.inverse[:, :P].reshape(B * P, H * k)
        row_scale = None  # S / N_read per unique row ("sum" MSE)
        if c.mse == "sum":
            n_samples = float(B * T) if seg.mask is None else (seg.mask[:, :P] > 0).sum().to(err.dtype)
            scale = n_samples * c.v_dim * k * H
            row_scale = scale / n_read.to(err.dtype)
        fuse_lr = not c.grad_clip and c.lr > 0  # then the scatter writes -lr * grad directly
        if fuse_lr:
            row_scale = -c.lr * (err.new_ones(len(urows)) if row_scale is None else row_scale)
        recipe = (read.weights[:, :P].reshape(B * P, H * k), d_read.reshape(B * P, -1), written, row_scale)
        grad = ops.scatter_rows(*recipe[:3], len(urows), row_scale, backend=c.backend)
        if fuse_lr:
            delta = grad
            grad_norm = delta.detach().norm() / c.lr
        else:
            if c.grad_clip:
                grad = grad.clamp(-1.0, 1.0)
            delta = -c.lr * grad
            grad_norm = grad.detach().norm()
        state.values.add(urows, delta, recipe if fuse_lr else None)
        return _usage_stats(n_read, B * T * H * k, c.n_slots, read.weights) | {"grad_norm_values": grad_norm}


def _read_updates(out: Tensor, w: Tensor, inv: Tensor, n_rows: int, updates: list, backend: str) -> Tensor:
    """``out`` (the read of a table without a graph) with the graph of each (hit, upd) of
    :meth:`SparseValues.rows` with ``split`` added: the reads of the rows ``hit`` differentiate
    into ``upd`` (the value, already in ``out``, is unchanged: each term adds ``e - e.detach()``)."""
    for hit, upd in updates:
        if not upd.requires_grad:
            continue
        readers, local_inv, keep = ops.reads_of_rows(inv, hit, n_rows)
        kept = (w[readers] * keep).detach()  # d out / d w is the plain read's already
        e = ops.weighted_gather(kept, upd, local_inv, backend=backend)
        out = out.index_add(0, readers, e - e.detach())
    return out


def _usage_stats(n_read: Tensor, total_reads: int, n_slots: int, weights: Tensor) -> dict:
    """Addressing statistics of one chunk: collisions, coverage, KL(slot usage || uniform), and
    ``effective_reads``, the mean over tokens of (sum w)^2 / sum w^2 over the token's H*k read
    weights: H*k when every read slot weighs the same (the read is a plain average of its slots),
    1 when one slot takes all the weight."""
    unique = n_read.numel()
    p = n_read.double() / total_reads
    kl = math.log(n_slots) + (p * p.log()).sum()
    w = weights.detach().flatten(2).flatten(0, 1)  # [B*T, H*k]
    participation = w.sum(-1).pow(2) / w.pow(2).sum(-1).clamp_min(torch.finfo(w.dtype).tiny)
    return {
        "collision_ratio": torch.tensor(1.0 - unique / total_reads),
        "coverage_ratio": torch.tensor(unique / n_slots),
        "kl_to_uniform": kl.float(),
        "effective_reads": participation.mean().float(),
    }


def _detach_read(read: Read) -> Read:
    top_sub = tuple((s.detach(), i) for s, i in read.top_sub)
    return Read(read.out.detach(), read.indices, read.weights.detach(), top_sub, read.urows, read.inverse,
                read.n_read)  # (drops out_for_keys)
