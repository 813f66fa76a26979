"""Pure-PyTorch paths of the memory's hot operations: the reference each kernel matches."""

from __future__ import annotations

import torch
from torch import Tensor


def sub_scores(q_half: Tensor, keys_half: Tensor, score: str) -> Tensor:
    """Scores of every sub-key for one half: q_half [B,T,H,d], keys_half [H,n,d] -> [B,T,H,n]."""
    dot = torch.einsum("bthd,hnd->bthn", q_half, keys_half)
    if score == "dot":
        return dot
    sq_dist = q_half.pow(2).sum(-1, keepdim=True) - 2 * dot + keys_half.pow(2).sum(-1)[None, None]
    return -torch.log(1e-3 + sq_dist.clamp_min(0.0))


def address(q: Tensor, keys: Tensor, topk: int, score: str):
    """Product-key addressing. q [B,T,H,dk], keys [H,2,n,dk/2].

    Returns ((top1, ids1), (top2, ids2)) per half, the top-k scores [B,T,H,k] of the
    k*k Cartesian sums and their slot ids i*n + j.
    """
    n = keys.shape[2]
    q1, q2 = q.chunk(2, dim=-1)
    top1, ids1 = sub_scores(q1, keys[:, 0], score).topk(topk, dim=-1)
    top2, ids2 = sub_scores(q2, keys[:, 1], score).topk(topk, dim=-1)
    cart = (top1.unsqueeze(-1) + top2.unsqueeze(-2)).flatten(-2)  # [B,T,H,k*k]
    scores, flat = cart.topk(topk, dim=-1)
    slots = ids1.gather(-1, flat // topk) * n + ids2.gather(-1, flat % topk)
    return ((top1, ids1), (top2, ids2)), scores, slots


def gather_rows(table: Tensor, rows: Tensor) -> Tensor:
    """table[rows] for a flat index vector."""
    return table.index_select(0, rows)


def scatter_rows(weights: Tensor, d_read: Tensor, row_pos: Tensor, n_rows: int) -> Tensor:
    """Gradient of the reads w.r.t. the rows they read, accumulated per unique row.

    weights [B,P,H,k], d_read [B,P,dv], row_pos [B*P*H*k] positions in [0, n_rows).
    Returns [n_rows, dv] = sum over reads r of weights[r] * d_read[token of r].
    """
    dv = d_read.shape[-1]
    per_read = (weights.unsqueeze(-1) * d_read[:, :, None, None, :]).reshape(-1, dv)
    return d_read.new_zeros(n_rows, dv).index_add(0, row_pos, per_read)
