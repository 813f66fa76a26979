"""Pure-PyTorch paths of the memory's hot operations: the reference each Triton kernel matches.

Every function here is a forward primitive without autograd of its own: ``kernels.ops``
wraps it (or its Triton twin) in ``torch.autograd.Function``s whose backward passes are
built from the same primitives, so the result is differentiable any number of times.

Shapes: a *table* is [R, D] (rows contiguous); ``idx`` [M, P] holds, for each of M
readers, P row ids into the table; ``w`` [M, P] holds their weights (None means 1).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor


# -- row primitives ----------------------------------------------------------------
# The weighted gather and the row dot products run as sparse-dense products with a CSR
# matrix whose row m holds the P entries (idx[m, p], w[m, p]): no [M, P, D] tensor of
# gathered rows is materialised (MKL sparse BLAS on the CPU, cuSPARSE on CUDA).
with warnings.catch_warnings():  # PyTorch warns once per process that sparse CSR is "beta": do it now, quietly
    warnings.simplefilter("ignore")
    torch.sparse_csr_tensor(torch.zeros(2, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                            (1, 1), check_invariants=False)


def _reader_csr(idx: Tensor, values: Tensor, n_cols: int) -> Tensor:
    M, P = idx.shape
    crow = torch.arange(0, M * P + 1, P, device=idx.device, dtype=torch.int64)
    return torch.sparse_csr_tensor(crow, idx.reshape(-1).to(torch.int64), values.reshape(-1), (M, n_cols),
                                   check_invariants=False)


def weighted_gather(w: Optional[Tensor], table: Tensor, idx: Tensor) -> Tensor:
    """out[m] = sum_p w[m, p] * table[idx[m, p]]  ->  [M, D]."""
    M, P = idx.shape
    if w is None or M == 0 or table.shape[0] == 0:
        rows = table.index_select(0, idx.reshape(-1)).view(M, P, table.shape[1])
        out = rows[:, 0] if P == 1 else rows.sum(1)
        return out if w is None else out.zero_()
    return _reader_csr(idx, w.to(table.dtype), table.shape[0]) @ table.contiguous()


def row_dot(x: Tensor, table: Tensor, idx: Tensor) -> Tensor:
    """out[m, p] = <x[m], table[idx[m, p]]>  ->  [M, P]."""
    M, P = idx.shape
    if M == 0 or P == 0 or table.shape[0] == 0:
        return x.new_zeros(M, P)
    if P > 1:
        ordered = idx.sort(1).values
        if (ordered[:, 1:] == ordered[:, :-1]).any():  # sampled_addmm wants distinct columns per row
            rows = table.index_select(0, idx.reshape(-1)).view(M, P, table.shape[1])
            return (rows * x.unsqueeze(1)).sum(-1)
    pattern = _reader_csr(idx, x.new_zeros(M * P), table.shape[0])
    return torch.sparse.sampled_addmm(pattern, x.contiguous(), table.t(), beta=0.0).values().view(M, P)


def rows_csr(idx: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """The reads grouped by the row they read: (order, offsets). ``order`` [M*P] lists the flat
    reads (m * P + p) sorted by row, stably; row r's reads are order[offsets[r]:offsets[r+1]]."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.zeros(n_rows + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(torch.bincount(flat, minlength=n_rows), 0, out=offsets[1:])
    return order, offsets


DENSE_SCATTER_ELEMENTS = 1 << 23  # M*P*D up to which scatter_rows materialises its [M*P, D] reads (32 MiB)


def scatter_rows(w: Optional[Tensor], x: Tensor, idx: Tensor, n_rows: int,
                 row_scale: Optional[Tensor] = None) -> Tensor:
    """out[r] = row_scale[r] * sum over (m, p) with idx[m, p] = r of w[m, p] * x[m]  ->  [n_rows, D].

    The memory's value update: per-read gradient rows accumulated per unique row and
    divided by N_read (``row_scale`` = S / N_read). A CSR matrix [n_rows, M] (row r holds
    the readers of r) times x: the [M*P, D] per-read rows are never materialised.
    """
    M, P = idx.shape
    if M * P == 0 or n_rows == 0:
        return x.new_zeros(n_rows, x.shape[1])
    if M * P * x.shape[1] <= DENSE_SCATTER_ELEMENTS:
        # small: the per-read rows fit in cache, and one index_add beats sorting the reads into a CSR
        reads = x.unsqueeze(1).expand(M, P, x.shape[1]) if w is None else w.to(x.dtype).unsqueeze(-1) * x.unsqueeze(1)
        out = x.new_zeros(n_rows, x.shape[1]).index_add_(0, idx.reshape(-1), reads.reshape(M * P, -1))
        return out if row_scale is None else out.mul_(row_scale.to(out.dtype).unsqueeze(-1))
    order, offsets = rows_csr(idx, n_rows)
    vals = x.new_ones(M * P) if w is None else w.reshape(-1).to(x.dtype)[order]
    S = torch.sparse_csr_tensor(offsets, order // P, vals, (n_rows, M), check_invariants=False)
    out = S @ x.contiguous()
    if row_scale is not None:
        out.mul_(row_scale.to(out.dtype).unsqueeze(-1))
    return out


# -- product-key addressing ----------------------------------------------------------
def sub_scores(q_half: Tensor, keys_half: Tensor, score: str) -> Tensor:
    """Scores of every sub-key for one half: q_half [B,T,H,d], keys_half [H,n,d] -> [B,T,H,n]."""
    dot = torch.einsum("bthd,hnd->bthn", q_half, keys_half)
    if score == "dot":
        return dot
    sq_dist = q_half.pow(2).sum(-1, keepdim=True) - 2 * dot + keys_half.pow(2).sum(-1)[None, None]
    return -torch.log(1e-3 + sq_dist.clamp_min(0.0))


SELECT_TILE_ELEMENTS = 1 << 18  # score entries per tile of tokens: 1 MiB of float32, cache-resident


def _torch_topk_ids(rank: Tensor, k: int) -> Tensor:
    return rank.topk(k, dim=-1).indices


def select_subkeys(q: Tensor, keys: Tensor, topk: int, score: str, topk_fn=_torch_topk_ids) -> Tensor:
    """Ids of the top-k sub-keys of each half, best first (no gradient).

    q [B,T,H,dk], keys [H,2,n,dk/2] -> [B,T,H,2,k] int64. Ranking key: <q, key> for
    ``dot``; for ``idw`` 2<q, key> - |key|^2, which orders sub-keys exactly as
    -log(1e-3 + |q - key|^2) does (|q|^2 is the same for every key of a row and the
    log is monotone) while costing one matrix product. Tokens go in tiles so that each
    tile's [tokens, n] score matrix stays in cache between the product and the top-k
    (``topk_fn(rank, k)``: the ids of ``rank.topk(k, dim=-1)``, or a kernel giving the same).
    """
    B, T, H, dk = q.shape
    n, d = keys.shape[2], dk // 2
    M = B * T
    with torch.no_grad():
        qh = q.detach().reshape(M, H, 2, d).permute(1, 2, 0, 3).reshape(H * 2, M, d)
        kh = keys.detach().reshape(H * 2, n, d)
        kt = kh.transpose(1, 2)
        bias = None if score == "dot" else -kh.pow(2).sum(-1).unsqueeze(1)
        ids = torch.empty(H * 2, M, topk, dtype=torch.int64, device=q.device)
        tile = max(1, SELECT_TILE_ELEMENTS // (n * H * 2))
        for start in range(0, M, tile):
            qt = qh[:, start:start + tile]
            rank = torch.bmm(qt, kt) if bias is None else torch.baddbmm(bias, qt, kt, alpha=2.0)
            ids[:, start:start + tile] = topk_fn(rank, topk)
    return ids.view(H, 2, B, T, topk).permute(2, 3, 0, 1, 4)


def address(q: Tensor, keys: Tensor, topk: int, score: str):
    """Dense product-key addressing (every sub-score differentiable); kept as a reference.

    q [B,T,H,dk], keys [H,2,n,dk/2]. Returns ((top1, ids1), (top2, ids2)) per half, the
    top-k scores [B,T,H,k] of the k*k Cartesian sums and their slot ids i*n + j.
    The memory uses :func:`kernels.ops.address`, the same function with sparse gradients.
    """
    n = keys.shape[2]
    q1, q2 = q.chunk(2, dim=-1)
    top1, ids1 = sub_scores(q1, keys[:, 0], score).topk(topk, dim=-1)
    top2, ids2 = sub_scores(q2, keys[:, 1], score).topk(topk, dim=-1)
    cart = (top1.unsqueeze(-1) + top2.unsqueeze(-2)).flatten(-2)  # [B,T,H,k*k]
    scores, flat = cart.topk(topk, dim=-1)
    slots = ids1.gather(-1, flat // topk) * n + ids2.gather(-1, flat % topk)
    return ((top1, ids1), (top2, ids2)), scores, slots
