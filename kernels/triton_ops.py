"""Triton kernels for the memory's hot paths; same signatures and results as ``torch_ops``.

- ``weighted_gather``: out[m] = sum_p w[m,p] * table[idx[m,p]] (the weighted read of value rows).
- ``row_dot``: out[m,p] = <x[m], table[idx[m,p]]> (gradient of a read w.r.t. its weights,
  dot-product scores of the selected sub-keys).
- ``scatter_rows``: per-read rows w[m,p] * x[m] summed per unique row r = idx[m,p] and scaled by
  row_scale[r] (the N_read-normalised value update, and the gradient of a gather). Deterministic:
  a segmented sum over the reads sorted by row, no atomics.
- ``select_subkeys``: product-key sub-key scoring fused with a running top-k, so the [tokens, n]
  score matrix is never written out.

Kernels run on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1``. They are
``triton.jit``-ed lazily, once per interpreter setting, so setting ``TRITON_INTERPRET`` after
this module was imported still takes effect.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .torch_ops import rows_csr

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
    IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the installation
    triton = tl = None
    HAVE_TRITON = False
    IMPORT_ERROR = exc


def interpret_mode() -> bool:
    """True when Triton runs kernels with its CPU interpreter (TRITON_INTERPRET=1)."""
    if not HAVE_TRITON:
        return False
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older Triton
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def can_run(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of ``device``."""
    return HAVE_TRITON and (device.type == "cuda" or interpret_mode())


def why_not(device: torch.device) -> str:
    if not HAVE_TRITON:
        return f"triton cannot be imported ({IMPORT_ERROR!r})"
    return (f"Triton kernels need CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 before the "
            "first kernel call to run them on the CPU with Triton's interpreter")


_JITTED: dict = {}


def _kernel(fn):
    key = (fn.__name__, interpret_mode())
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


def _pow2(x: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def _check(*tensors: Tensor) -> None:
    for t in tensors:
        if t is not None and not can_run(t.device):
            raise RuntimeError(why_not(t.device))


# -- kernels (plain functions, jitted on first use) ------------------------------------
# Reductions are written as ``tl.reduce(x, axis, <triton's combine function>)``, which is what
# tl.sum / tl.max / tl.argmax expand to, and zeros as tl.full, rather than calling those helpers: they are
# ``@triton.jit`` functions fixed when triton.language is first imported, so if another
# library imported triton before TRITON_INTERPRET was set, the interpreter could not call them.
if HAVE_TRITON:
    _SUM = tl.standard._sum_combine
    _MAX = tl.standard._elementwise_max
    _MIN = tl.standard._elementwise_min
    _ARGMAX = tl.standard._argmax_combine_tie_break_left
    _ARGMIN = tl.standard._argmin_combine_tie_break_left

    def _weighted_gather_kernel(w_ptr, table_ptr, idx_ptr, out_ptr, P, D,
                                HAS_W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        m = tl.program_id(0)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_p = tl.arange(0, BLOCK_P)
        pm = offs_p < P
        dm = offs_d < D
        rows = tl.load(idx_ptr + m * P + offs_p, mask=pm, other=0).to(tl.int64)
        vals = tl.load(table_ptr + rows[:, None] * D + offs_d[None, :], mask=pm[:, None] & dm[None, :], other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + m * P + offs_p, mask=pm, other=0.0)
            vals = vals * w[:, None]
        tl.store(out_ptr + m * D + offs_d, tl.reduce(vals, 0, _SUM), mask=dm)

    def _row_dot_kernel(x_ptr, table_ptr, idx_ptr, out_ptr, P, D,
                        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        m = tl.program_id(0)
        offs_p = tl.arange(0, BLOCK_P)
        pm = offs_p < P
        rows = tl.load(idx_ptr + m * P + offs_p, mask=pm, other=0).to(tl.int64)
        acc = tl.full([BLOCK_P], 0, out_ptr.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dm = offs_d < D
            x = tl.load(x_ptr + m * D + offs_d, mask=dm, other=0.0)
            vals = tl.load(table_ptr + rows[:, None] * D + offs_d[None, :], mask=pm[:, None] & dm[None, :],
                           other=0.0)
            acc += tl.reduce(vals * x[None, :], 1, _SUM)
        tl.store(out_ptr + m * P + offs_p, acc, mask=pm)

    def _scatter_rows_kernel(w_ptr, x_ptr, order_ptr, offsets_ptr, scale_ptr, out_ptr, P, D,
                             HAS_W: tl.constexpr, HAS_SCALE: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.program_id(0)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = offs_d < D
        start = tl.load(offsets_ptr + r)
        stop = tl.load(offsets_ptr + r + 1)
        acc = tl.full([BLOCK_D], 0, out_ptr.dtype.element_ty)
        for s in range(start, stop, BLOCK_R):
            offs_r = s + tl.arange(0, BLOCK_R)
            rm = offs_r < stop
            read = tl.load(order_ptr + offs_r, mask=rm, other=0).to(tl.int64)  # flat (m, p) of each read
            tok = read // P
            vals = tl.load(x_ptr + tok[:, None] * D + offs_d[None, :], mask=rm[:, None] & dm[None, :], other=0.0)
            if HAS_W:
                w = tl.load(w_ptr + read, mask=rm, other=0.0)
                vals = vals * w[:, None]
            acc += tl.reduce(vals, 0, _SUM)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + r)
        tl.store(out_ptr + r * D + offs_d, acc, mask=dm)

    def _select_subkeys_kernel(q_ptr, k_ptr, out_ptr, M, N, D, HD2,
                               K: tl.constexpr, KP: tl.constexpr, IDW: tl.constexpr, USE_DOT: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """ids of the K best sub-keys of one (head, half) for BLOCK_M tokens, best first.

        q: [M, H*2, D] contiguous, keys: [H*2, N, D] contiguous, out: [M, H*2, K] int64.
        Ranking key: <q, key> (dot) or 2<q, key> - |key|^2 (idw, same order as -log(1e-3 + |q-key|^2)).
        """
        pid_m = tl.program_id(0)
        g = tl.program_id(1)  # head * 2 + half
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mm = offs_m < M
        kcols = tl.arange(0, KP)
        # running top-K per token; padding slots (>= K) hold +inf so they are never the minimum
        best_v = tl.where(kcols[None, :] < K, float("-inf"), float("inf")) + tl.full(
            [BLOCK_M, KP], 0, q_ptr.dtype.element_ty)
        best_i = tl.full([BLOCK_M, KP], 0, tl.int64)
        kslots = tl.broadcast_to(kcols[None, :], [BLOCK_M, KP])
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nm = offs_n < N
            acc = tl.full([BLOCK_M, BLOCK_N], 0, q_ptr.dtype.element_ty)
            knorm = tl.full([BLOCK_N], 0, q_ptr.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                dm = offs_d < D
                qt = tl.load(q_ptr + offs_m[:, None] * HD2 * D + g * D + offs_d[None, :],
                             mask=mm[:, None] & dm[None, :], other=0.0)
                kt = tl.load(k_ptr + g * N * D + offs_n[:, None] * D + offs_d[None, :],
                             mask=nm[:, None] & dm[None, :], other=0.0)
                if USE_DOT:
                    acc += tl.dot(qt, tl.trans(kt), input_precision="ieee")
                else:
                    acc += tl.reduce(qt[:, None, :] * kt[None, :, :], 2, _SUM)
                if IDW:
                    knorm += tl.reduce(kt * kt, 1, _SUM)
            if IDW:
                sel = 2.0 * acc - knorm[None, :]
            else:
                sel = acc
            sel = tl.where(nm[None, :], sel, float("-inf"))
            local = tl.broadcast_to(tl.arange(0, BLOCK_N)[None, :], [BLOCK_M, BLOCK_N])
            for _ in tl.static_range(K):  # merge the tile's K best into the running top-K
                tv, ta = tl.reduce((sel, local), 1, _ARGMAX)
                cur, cur_pos = tl.reduce((best_v, kslots), 1, _ARGMIN)
                repl = (kslots == cur_pos[:, None]) & (tv > cur)[:, None]
                best_v = tl.where(repl, tv[:, None], best_v)
                best_i = tl.where(repl, (n0 + ta).to(tl.int64)[:, None], best_i)
                sel = tl.where(local == ta[:, None], float("-inf"), sel)
        best_v = tl.where(kcols[None, :] < K, best_v, float("-inf"))
        for r in tl.static_range(K):  # emit best first
            _, a = tl.reduce((best_v, kslots), 1, _ARGMAX)
            hit = kslots == a[:, None]
            tl.store(out_ptr + offs_m * HD2 * K + g * K + r, tl.reduce(tl.where(hit, best_i, 0), 1, _SUM), mask=mm)
            best_v = tl.where(hit, float("-inf"), best_v)


# -- wrappers: same signatures as torch_ops --------------------------------------------
def weighted_gather(w: Optional[Tensor], table: Tensor, idx: Tensor) -> Tensor:
    _check(table)
    M, P = idx.shape
    R, D = table.shape
    table = table.contiguous()
    idx = idx.contiguous()
    out = table.new_empty(M, D)
    if M == 0 or D == 0:
        return out.zero_()
    w = None if w is None else w.to(table.dtype).contiguous()
    BLOCK_D = min(_pow2(D, 16), 128)
    grid = (M, triton.cdiv(D, BLOCK_D))
    _kernel(_weighted_gather_kernel)[grid](w if w is not None else table, table, idx, out, P, D,
                                           HAS_W=w is not None, BLOCK_P=_pow2(P), BLOCK_D=BLOCK_D)
    return out


def row_dot(x: Tensor, table: Tensor, idx: Tensor) -> Tensor:
    _check(table)
    M, P = idx.shape
    R, D = table.shape
    out = table.new_empty(M, P)
    if M == 0 or P == 0:
        return out
    if D == 0:
        return out.zero_()
    BLOCK_D = min(_pow2(D, 16), 128)
    _kernel(_row_dot_kernel)[(M,)](x.to(table.dtype).contiguous(), table.contiguous(), idx.contiguous(), out,
                                   P, D, BLOCK_P=_pow2(P), BLOCK_D=BLOCK_D)
    return out


def scatter_rows(w: Optional[Tensor], x: Tensor, idx: Tensor, n_rows: int,
                 row_scale: Optional[Tensor] = None) -> Tensor:
    _check(x)
    M, P = idx.shape
    D = x.shape[1]
    out = x.new_empty(n_rows, D)
    if n_rows == 0 or D == 0:
        return out.zero_()
    order, offsets = rows_csr(idx, n_rows)  # reads sorted by row (stably) and segment offsets
    w = None if w is None else w.to(x.dtype).contiguous()
    scale = None if row_scale is None else row_scale.to(x.dtype).contiguous()
    BLOCK_D = min(_pow2(D, 16), 128)
    grid = (n_rows, triton.cdiv(D, BLOCK_D))
    _kernel(_scatter_rows_kernel)[grid](w if w is not None else x, x.contiguous(), order, offsets,
                                        scale if scale is not None else x, out, P, D,
                                        HAS_W=w is not None, HAS_SCALE=scale is not None,
                                        BLOCK_R=16, BLOCK_D=BLOCK_D)
    return out


def select_subkeys(q: Tensor, keys: Tensor, topk: int, score: str) -> Tensor:
    """q [B,T,H,dk], keys [H,2,n,dk/2] -> ids [B,T,H,2,k] int64, best first (see torch_ops)."""
    _check(q)
    B, T, H, dk = q.shape
    n, d = keys.shape[2], dk // 2
    M = B * T
    out = torch.empty(B, T, H, 2, topk, dtype=torch.int64, device=q.device)
    if M == 0:
        return out
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc = q.detach().to(dtype).reshape(M, H * 2, d).contiguous()
    kc = keys.detach().to(dtype).reshape(H * 2, n, d).contiguous()
    use_dot = dtype == torch.float32
    BLOCK_M = 32 if use_dot else 16
    BLOCK_N = 64 if use_dot else 16
    BLOCK_D = min(_pow2(d, 16), 64 if use_dot else 16)
    grid = (triton.cdiv(M, BLOCK_M), H * 2)
    _kernel(_select_subkeys_kernel)[grid](qc, kc, out, M, n, d, H * 2, K=topk, KP=_pow2(topk),
                                          IDW=score == "idw", USE_DOT=use_dot,
                                          BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    return out
