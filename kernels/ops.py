"""Dispatch of the memory's hot paths: Triton on CUDA, PyTorch elsewhere.

Backends: ``"torch"`` (``kernels.torch_ops``), ``"triton"`` (``kernels.triton_ops``: CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``"cpu"`` (``kernels.cpu_ops``: C++
loops for CPU tensors, compiled on first use) and ``"auto"`` (Triton when the tensors are on
CUDA and triton imports; the C++ kernels for CPU tensors when they build and
``FWPKM_CPU_KERNELS`` is not 0; else PyTorch).

``set_backend("torch" | "triton" | "auto")`` forces a path for the whole process; a per-call
``backend=`` (a memory passes its ``config.backend``) does the same for one call and wins over
the process setting unless it is ``"auto"``/None.

Differentiation: three row operations are closed under differentiation,

    weighted_gather(w, T, idx)[m]   = sum_p w[m,p] T[idx[m,p]]
    row_dot(x, T, idx)[m,p]         = <x[m], T[idx[m,p]]>
    scatter_rows(w, x, idx, R)[r]   = sum_{idx[m,p]=r} w[m,p] x[m]

(the gradient of each is made of the other two), so each is an autograd Function whose
backward calls the others: every order of gradient (the meta-gradient path differentiates
through inner gradients) runs on the chosen backend, and only indices, weights and the small
tables are kept for backward, never gathered rows. ``scatter_rows_at`` (some rows of a scatter
already computed) has a backward made of the same two, restricted to the reads of those rows.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import torch_ops

BACKENDS = ("auto", "torch", "triton", "cpu")
_process_backend = "auto"


def set_backend(name: str) -> None:
    """Force the backend of every call that does not name one ("auto" restores the default)."""
    global _process_backend
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {BACKENDS}")
    _process_backend = name


def get_backend() -> str:
    return _process_backend


class use_backend:
    """Context manager: ``with use_backend("triton"): ...`` sets the process backend temporarily."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.saved = get_backend()
        set_backend(self.name)
        return self

    def __exit__(self, *exc):
        set_backend(self.saved)


def _triton():
    from . import triton_ops  # imported lazily: importing triton costs time and may fail

    return triton_ops


def _cpu():
    from . import cpu_ops  # imported lazily: the first use compiles the extension

    return cpu_ops


def cpu_kernels_available() -> bool:
    try:
        return _cpu().can_run(torch.device("cpu"))
    except Exception:
        return False


def triton_available(device: torch.device | str = "cuda") -> bool:
    try:
        return _triton().can_run(torch.device(device))
    except Exception:
        return False


def resolve(backend: Optional[str], *tensors: Tensor) -> str:
    """The concrete backend ("torch", "triton" or "cpu") for a call on ``tensors``."""
    name = backend if backend not in (None, "auto") else _process_backend
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {BACKENDS}")
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    if name == "auto":
        if device.type == "cuda":
            return "triton" if triton_available(device) else "torch"
        return "cpu" if device.type == "cpu" and _cpu().enabled_for_auto() and cpu_kernels_available() else "torch"
    if name in ("triton", "cpu"):
        impl = _impl(name)
        if not impl.can_run(device):
            raise RuntimeError(f"backend={name!r}: {impl.why_not(device)}")
    return name


def _impl(name: str):
    return _triton() if name == "triton" else _cpu() if name == "cpu" else torch_ops


def _topk(x: Tensor, k: int, name: str) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=-1)``; with the C++ kernels the same ids, the values gathered (differentiable)."""
    if name != "cpu":
        return x.topk(k, dim=-1)
    ids = _cpu().topk_rows(x, k)[1]
    return x.gather(-1, ids), ids


# -- the three row operations as autograd Functions ---------------------------------
class _WeightedGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, table, idx, backend):
        need_w, need_t = ctx.needs_input_grad[:2]
        # grad w.r.t. w needs the table; grad w.r.t. the table needs w: keep only what is needed
        ctx.save_for_backward(w if need_t else None, table if need_w else None, idx)
        ctx.n_rows, ctx.backend = table.shape[0], backend
        return _impl(backend).weighted_gather(w, table, idx)

    @staticmethod
    def backward(ctx, grad):
        w, table, idx = ctx.saved_tensors
        gw = gt = None
        if ctx.needs_input_grad[0]:
            gw = _RowDot.apply(grad, table, idx, ctx.backend)
        if ctx.needs_input_grad[1]:
            gt = _ScatterRows.apply(w, grad, idx, ctx.n_rows, None, ctx.backend)
        return gw, gt, None, None


class _RowDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, idx, backend):
        need_x, need_t = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if need_t else None, table if need_x else None, idx)
        ctx.n_rows, ctx.backend = table.shape[0], backend
        return _impl(backend).row_dot(x, table, idx)

    @staticmethod
    def backward(ctx, grad):
        x, table, idx = ctx.saved_tensors
        gx = gt = None
        if ctx.needs_input_grad[0]:
            gx = _WeightedGather.apply(grad, table, idx, ctx.backend)
        if ctx.needs_input_grad[1]:
            gt = _ScatterRows.apply(grad, x, idx, ctx.n_rows, None, ctx.backend)
        return gx, gt, None, None


class _ScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, x, idx, n_rows, row_scale, backend):
        need_w, need_x = ctx.needs_input_grad[:2]
        ctx.save_for_backward(w if need_x else None, x if need_w else None, idx, row_scale)
        ctx.backend = backend
        return _impl(backend).scatter_rows(w, x, idx, n_rows, row_scale)

    @staticmethod
    def backward(ctx, grad):
        w, x, idx, row_scale = ctx.saved_tensors
        if row_scale is not None:
            grad = grad * row_scale.unsqueeze(-1)
        gw = gx = None
        if ctx.needs_input_grad[0]:
            gw = _RowDot.apply(x, grad, idx, ctx.backend)
        if ctx.needs_input_grad[1]:
            gx = _WeightedGather.apply(w, grad, idx, ctx.backend)
        return gw, gx, None, None, None, None


def reads_of_rows(idx: Tensor, rows: Tensor, n_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """The readers of idx [M, P] (ids in [0, n_rows)) that read any of the distinct ``rows``:
    (readers [M'], their ids as positions in ``rows`` [M', P] (0 where not in rows), keep [M', P]
    (whether the id is in rows))."""
    local = torch.full((n_rows,), -1, dtype=idx.dtype, device=idx.device)
    local[rows] = torch.arange(len(rows), dtype=idx.dtype, device=idx.device)
    local_idx = local[idx]
    readers = (local_idx >= 0).any(-1).nonzero().squeeze(-1)
    local_idx = local_idx[readers]
    keep = local_idx >= 0
    return readers, local_idx.clamp_min(0), keep


class _ScatterRowsAt(torch.autograd.Function):
    """scatter_rows(w, x, idx, n_rows, row_scale)[sel] from that scatter's value, computed before.

    The forward only selects rows; the backward goes straight to w and x through the reads
    that wrote the selected rows, so no [n_rows, D] gradient is ever formed."""

    @staticmethod
    def forward(ctx, w, x, idx, row_scale, sel, value, backend):
        ctx.save_for_backward(w, x, idx, row_scale, sel)
        ctx.n_rows, ctx.backend = value.shape[0], backend
        return value.index_select(0, sel)

    @staticmethod
    def backward(ctx, grad):
        w, x, idx, row_scale, sel = ctx.saved_tensors
        readers, local_idx, keep = reads_of_rows(idx, sel, ctx.n_rows)  # the reads that wrote a row of sel
        if row_scale is not None:
            grad = grad * row_scale[sel].unsqueeze(-1)
        gw = gx = None
        if ctx.needs_input_grad[0]:
            gw_read = _RowDot.apply(x[readers], grad, local_idx, ctx.backend) * keep
            gw = gw_read.new_zeros(w.shape).index_copy(0, readers, gw_read)
        if ctx.needs_input_grad[1]:
            kept = keep.to(x.dtype) if w is None else w[readers] * keep
            gx_read = _WeightedGather.apply(kept, grad, local_idx, ctx.backend)
            gx = gx_read.new_zeros(x.shape).index_copy(0, readers, gx_read)
        return gw, gx, None, None, None, None, None


def weighted_gather(w: Optional[Tensor], table: Tensor, idx: Tensor, backend: Optional[str] = None) -> Tensor:
    """out[m] = sum_p w[m,p] * table[idx[m,p]]: w [M,P] (None = 1), table [R,D], idx [M,P] -> [M,D]."""
    if w is not None and w.dtype != table.dtype:
        w = w.to(table.dtype)
    return _WeightedGather.apply(w, table, idx, resolve(backend, table))


def row_dot(x: Tensor, table: Tensor, idx: Tensor, backend: Optional[str] = None) -> Tensor:
    """out[m,p] = <x[m], table[idx[m,p]]>: x [M,D], table [R,D], idx [M,P] -> [M,P]."""
    return _RowDot.apply(x, table, idx, resolve(backend, table))


def scatter_rows(w: Optional[Tensor], x: Tensor, idx: Tensor, n_rows: int, row_scale: Optional[Tensor] = None,
                 backend: Optional[str] = None) -> Tensor:
    """out[r] = row_scale[r] * sum_{idx[m,p]=r} w[m,p] * x[m]: the per-unique-row sum of per-read
    rows (the memory's N_read-normalised value update). w [M,P] (None = 1), x [M,D], idx [M,P]
    in [0, n_rows), row_scale [n_rows] or None (not differentiated) -> [n_rows, D]."""
    if row_scale is not None:
        row_scale = row_scale.detach().to(x.dtype)
    if w is not None and w.dtype != x.dtype:
        w = w.to(x.dtype)
    return _ScatterRows.apply(w, x, idx, n_rows, row_scale, resolve(backend, x))


def scatter_rows_at(w: Optional[Tensor], x: Tensor, idx: Tensor, row_scale: Optional[Tensor], sel: Tensor,
                    value: Tensor, backend: Optional[str] = None) -> Tensor:
    """``scatter_rows(w, x, idx, n_rows, row_scale)[sel]`` given ``value``, that scatter's result
    (n_rows = len(value)): rows ``sel`` of value, differentiable w.r.t. w and x at the cost of
    the reads, not of n_rows (a chunk reading a few rows of an earlier chunk's update)."""
    if row_scale is not None:
        row_scale = row_scale.detach().to(x.dtype)
    if w is not None and w.dtype != x.dtype:
        w = w.to(x.dtype)
    return _ScatterRowsAt.apply(w, x, idx, row_scale, sel, value.detach(), resolve(backend, x))


def gather_rows(table: Tensor, rows: Tensor, backend: Optional[str] = None) -> Tensor:
    """table[rows] for a flat index vector, differentiable w.r.t. the table (sparse backward)."""
    return weighted_gather(None, table, rows.reshape(-1, 1), backend)


# -- product-key addressing -------------------------------------------------------------
def select_subkeys(q: Tensor, keys: Tensor, topk: int, score: str, backend: Optional[str] = None) -> Tensor:
    """Ids [B,T,H,2,k] of the top-k sub-keys of each half, best first (not differentiable)."""
    return _impl(resolve(backend, q)).select_subkeys(q, keys, topk, score)


def address(q: Tensor, keys: Tensor, topk: int, score: str, backend: Optional[str] = None):
    """Product-key addressing (spec 1.1 steps 1-2). q [B,T,H,dk], keys [H,2,n,dk/2].

    Returns ((top1, ids1), (top2, ids2)) per half (top-k sub-scores [B,T,H,k], best first, and
    their sub-key ids), the top-k scores [B,T,H,k] of the k*k Cartesian sums and their slot
    ids i*n + j.

    Same function as ``torch_ops.address``, sparse in its gradients: the sub-keys are
    selected without a graph (one scoring pass, O(n dk) per token, by a fused Triton kernel
    or a matrix product), then the k winning scores of each half are recomputed with
    ``row_dot`` (a graph of O(k) per token), so every backward costs O(k dk) per token
    instead of O(n dk), and no [tokens, n] matrix is kept.
    """
    B, T, H, dk = q.shape
    n, d = keys.shape[2], dk // 2
    name = resolve(backend, q)
    ids = select_subkeys(q, keys, topk, score, name)  # [B,T,H,2,k]
    groups = torch.arange(H * 2, device=q.device).view(H, 2, 1) * n
    flat_ids = (ids + groups).reshape(B * T * H * 2, topk)  # rows of keys viewed as [H*2*n, d]
    table = keys.reshape(H * 2 * n, d)
    x = q.reshape(B * T * H * 2, d)
    s = row_dot(x, table, flat_ids, name)  # [B*T*H*2, k]
    if score == "idw":  # |q - key|^2 = |q|^2 - 2 <q, key> + |key|^2, as the dense scoring computes it
        key_sq = table.pow(2).sum(-1)
        sq_dist = x.pow(2).sum(-1, keepdim=True) - 2 * s + key_sq[flat_ids]
        s = -torch.log(1e-3 + sq_dist.clamp_min(0.0))
    s = s.view(B, T, H, 2, topk)
    top1, top2 = s[..., 0, :], s[..., 1, :]
    ids1, ids2 = ids[..., 0, :], ids[..., 1, :]
    cart = (top1.unsqueeze(-1) + top2.unsqueeze(-2)).flatten(-2)  # [B,T,H,k*k]
    scores, flat = _topk(cart, topk, name)
    slots = ids1.gather(-1, flat // topk) * n + ids2.gather(-1, flat % topk)
    return ((top1, ids1), (top2, ids2)), scores, slots
