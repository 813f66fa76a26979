"""A dense implementation of the FwPKM memory core, as the paper's public code does it.

Same algorithm and same results as ``tests/reference.py`` (checked in
``tests/test_kernels.py``), written the way the paper's code works rather than line by line:

- the value table is one dense [N, dv] graph tensor; each chunk takes the autograd gradient
  of the memorisation loss w.r.t. the whole table (a dense N x dv gradient, built with
  create_graph in training) and makes a new dense copy V - lr * (S * g / N_read + wd * V);
- addressing is vectorised over heads with matrix-product scoring (the full [tokens, n]
  sub-score matrices stay in the graph, as in the paper's code).

It is the baseline of ``bench_memory.py``; only the handling of the value table differs
from the project's sparse core.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.torch_ops import sub_scores
from tests.reference import marginal_entropy


def read(q, K, V, cfg):
    """q [B,L,H*dk] -> out [B,L,dv], slot ids [B,L,H,k], sub-score rows per half [B,L,H,n]."""
    B, L, _ = q.shape
    H, n, k, dk = cfg["heads"], cfg["n_subkeys"], cfg["topk"], cfg["k_dim"]
    q = q.view(B, L, H, dk)
    s1 = sub_scores(q[..., : dk // 2], K[:, 0], cfg["score"])
    s2 = sub_scores(q[..., dk // 2:], K[:, 1], cfg["score"])
    v1, i1 = s1.topk(k, -1)
    v2, i2 = s2.topk(k, -1)
    sums = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)
    s, pick = sums.topk(k, -1)
    idx = i1.gather(-1, pick // k) * n + i2.gather(-1, pick % k)
    t = s / cfg["temperature"]
    if cfg["score_fn"] == "softmax":
        w = torch.softmax(t.reshape(B, L, H * k), -1).view(B, L, H, k)
    else:
        w = F.silu(t) if cfg["score_fn"] == "silu" else F.relu(t)
    out = torch.einsum("blhk,blhkd->bld", w, V[idx])
    return out, idx, s1, s2


def run(keys, values, q, v, gates, mask, cfg, chunk, graph=True):
    """One call: returns reads [B,T,dv], final keys, final values (same contract as tests/reference.run)."""
    K = keys.detach().clone().requires_grad_(True)
    V = values.detach().clone().requires_grad_(True)
    B, T, _ = q.shape
    L, H, k, dv, N = cfg["lookahead"], cfg["heads"], cfg["topk"], cfg["v_dim"], cfg["n_subkeys"] ** 2
    a = cfg["addr_loss_weight"] or 0.0
    keys_update = bool(a) or not cfg["grad_to_values_only"]
    outs = []
    with torch.enable_grad():
        for start in range(0, T, chunk):
            stop = min(T, start + chunk)
            n_tok = stop - start
            out, idx, rows1, rows2 = read(q[:, start:stop], K, V, cfg)
            outs.append(out if graph else out.detach())
            P = n_tok - L
            if P <= 0:
                continue
            e = ((out[:, :P] - v[:, start + L: stop]) ** 2).mean(-1)
            if mask is not None:
                e = e * mask[:, start: start + P]
            if gates is not None:
                e = e * gates[:, start: start + P]
            mem_loss = 0.5 * e.mean()
            addr_loss = -a * (marginal_entropy(rows1, k) + marginal_entropy(rows2, k)) if a else 0.0 * mem_loss
            gV = torch.autograd.grad(mem_loss, V, create_graph=graph, retain_graph=True)[0]  # dense [N, dv]
            if cfg["mse"] == "sum":
                n_read = torch.bincount(idx.reshape(-1), minlength=N).clamp_min(1).to(gV.dtype)
                n_samples = (mask[:, start: start + P] > 0).sum() if mask is not None else B * n_tok
                gV = gV * (n_samples * dv * k * H) / n_read.unsqueeze(-1)
            if keys_update:
                k_loss = addr_loss if cfg["grad_to_values_only"] else mem_loss + addr_loss
                gK = torch.autograd.grad(k_loss, K, create_graph=graph, retain_graph=True)[0]
            if cfg["grad_clip"]:
                gV = gV.clamp(-1, 1)
                if keys_update:
                    gK = gK.clamp(-1, 1)
            lr, wd = cfg["lr"], cfg["weight_decay"]
            V = V - lr * (gV + wd * V)  # a new dense copy of the table every chunk
            if keys_update:
                K = K - lr * (gK + wd * K)
            if not graph:
                V = V.detach().requires_grad_(True)
                K = K.detach().requires_grad_(True)
    return torch.cat(outs, 1), K, V
