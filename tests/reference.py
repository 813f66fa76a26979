"""A dense, line-by-line implementation of FWPKM_SPEC section 1, for tests only.

Written for clarity, not speed: full N x dv value table, full score matrices,
autograd for every inner gradient. The library's sparse core must match it.
"""

from __future__ import annotations

import torch


def score(q, key, kind):
    """q [..., d], key [n, d] -> [..., n]"""
    if kind == "dot":
        return q @ key.T
    diff = q.unsqueeze(-2) - key  # [..., n, d]
    return -torch.log(1e-3 + (diff**2).sum(-1))


def read(q, K, V, cfg):
    """q [B,L,H*dk] -> out [B,L,dv], slot ids [B,L,H,k], sub-score rows per half [B,L,H,n]."""
    B, L, _ = q.shape
    H, n, k, dk = cfg["heads"], cfg["n_subkeys"], cfg["topk"], cfg["k_dim"]
    q = q.view(B, L, H, dk)
    all_idx, all_s, rows1, rows2 = [], [], [], []
    for h in range(H):
        s1 = score(q[:, :, h, : dk // 2], K[h, 0], cfg["score"])  # [B,L,n]
        s2 = score(q[:, :, h, dk // 2 :], K[h, 1], cfg["score"])
        rows1.append(s1)
        rows2.append(s2)
        v1, i1 = s1.topk(k, -1)
        v2, i2 = s2.topk(k, -1)
        sums = torch.stack([v1[..., a] + v2[..., b] for a in range(k) for b in range(k)], -1)
        ids = torch.stack([i1[..., a] * n + i2[..., b] for a in range(k) for b in range(k)], -1)
        top, pick = sums.topk(k, -1)
        all_s.append(top)
        all_idx.append(ids.gather(-1, pick))
    s = torch.stack(all_s, 2)  # [B,L,H,k]
    idx = torch.stack(all_idx, 2)
    t = s / cfg["temperature"]
    if cfg["score_fn"] == "softmax":
        w = torch.softmax(t.reshape(B, L, H * k), -1).view(B, L, H, k)
    elif cfg["score_fn"] == "silu":
        w = torch.nn.functional.silu(t)
    else:
        w = torch.relu(t)
    out = (w.unsqueeze(-1) * V[idx]).sum((2, 3))
    return out, idx, torch.stack(rows1, 2), torch.stack(rows2, 2)


def marginal_entropy(rows, k):
    """rows [..., n]: keep each row's top-k (others -inf), softmax, average, entropy."""
    n = rows.shape[-1]
    top, ids = rows.topk(k, -1)
    masked = torch.full_like(rows, float("-inf")).scatter(-1, ids, top)
    p_bar = torch.softmax(masked, -1).reshape(-1, n).mean(0)
    return -(p_bar * torch.log(p_bar + 1e-8)).sum()


def run(keys, values, q, v, gates, mask, cfg, chunk, graph=True):
    """One call: returns reads [B,T,dv], final keys, final values."""
    K = keys.clone().requires_grad_(True)
    V = values.clone().requires_grad_(True)
    B, T, _ = q.shape
    L, H, k, dv, N = cfg["lookahead"], cfg["heads"], cfg["topk"], cfg["v_dim"], cfg["n_subkeys"] ** 2
    a = cfg["addr_loss_weight"] or 0.0
    keys_update = bool(a) or not cfg["grad_to_values_only"]
    outs = []
    for start in range(0, T, chunk):
        stop = min(T, start + chunk)
        n_tok = stop - start
        out, idx, rows1, rows2 = read(q[:, start:stop], K, V, cfg)
        outs.append(out)
        P = n_tok - L
        if P <= 0:
            continue
        e = ((out[:, :P] - v[:, start + L : stop]) ** 2).mean(-1)
        if mask is not None:
            e = e * mask[:, start : start + P]
        if gates is not None:
            e = e * gates[:, start : start + P]
        mem_loss = 0.5 * e.mean()
        addr_loss = -a * (marginal_entropy(rows1, k) + marginal_entropy(rows2, k)) if a else 0.0 * mem_loss

        gV = torch.autograd.grad(mem_loss, V, create_graph=graph, retain_graph=True)[0]
        if cfg["mse"] == "sum":
            n_read = torch.bincount(idx.reshape(-1), minlength=N).clamp_min(1).to(gV.dtype)
            if mask is not None:
                n_samples = (mask[:, start : start + P] > 0).sum()
            else:
                n_samples = B * n_tok
            gV = gV * n_samples * dv * k * H / n_read.unsqueeze(-1)
        if keys_update:
            k_loss = addr_loss if cfg["grad_to_values_only"] else mem_loss + addr_loss
            gK = torch.autograd.grad(k_loss, K, create_graph=graph, retain_graph=True)[0]
        if cfg["grad_clip"]:
            gV = gV.clamp(-1, 1)
            if keys_update:
                gK = gK.clamp(-1, 1)
        lr, wd = cfg["lr"], cfg["weight_decay"]
        V = V - lr * (gV + wd * V)
        if keys_update:
            K = K - lr * (gK + wd * K)
    return torch.cat(outs, 1), K, V
