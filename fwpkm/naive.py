"""A dense, readable implementation of the FwPKM memory core (spec section 1).

What it is for:

- the correctness reference of the tests: the library's sparse core (``fwpkm.memory``), with
  either backend of ``kernels``, must give the same reads, final keys and values and
  meta-gradients (tests/test_memory.py, tests/test_kernels.py);
- the dense baseline of ``benchmarks/bench_memory.py``: the algorithm as the paper's public
  code runs it.

Written for clarity, not speed: the value table is one dense [N, dv] graph tensor; each chunk
takes the autograd gradient of its losses w.r.t. the whole table (a dense N x dv gradient,
built with create_graph, so the meta-gradients reach q, v and the gates) and makes a new dense
copy of the table; addressing scores every sub-key (the full [tokens, n] sub-score matrices
stay in the graph). Time and memory grow with N here; the library's do not.

``cfg`` is a plain dict of :class:`fwpkm.config.MemoryConfig`'s fields
(``dataclasses.asdict(memory.config)``). Not imported by ``fwpkm`` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.torch_ops import sub_scores


def run(keys, values, q, v, gates, mask, cfg, chunk):
    """One call of the memory, ``chunk`` tokens at a time, from the state (keys, values):
    q [B,T,H*dk], v [B,T,dv], gates and mask [B,T] or None -> the reads [B,T,dv] and the
    final keys and values, in one autograd graph with q, v and gates."""
    K = keys.detach().clone().requires_grad_(True)
    V = values.detach().clone().requires_grad_(True)
    T, L = q.shape[1], cfg["lookahead"]
    outs = []
    for start in range(0, T, chunk):
        stop = min(T, start + chunk)
        out, idx, rows = read(q[:, start:stop], K, V, cfg)
        outs.append(out)
        P = stop - start - L  # positions whose target (L tokens ahead) is inside the chunk
        if P > 0:
            weights = [None if x is None else x[:, start:start + P] for x in (gates, mask)]
            K, V = write(K, V, out[:, :P], idx, rows, v[:, start + L:stop], *weights, cfg)
    return torch.cat(outs, 1), K, V


def read(q, K, V, cfg):
    """Product-key read of one chunk, q [B,C,H*dk] -> the reads [B,C,dv], the slot ids
    [B,C,H,k] and the sub-score rows of each half, ([B,C,H,n], [B,C,H,n])."""
    B, C, _ = q.shape
    H, n, k = cfg["heads"], cfg["n_subkeys"], cfg["topk"]
    q1, q2 = q.view(B, C, H, -1).chunk(2, -1)
    rows = sub_scores(q1, K[:, 0], cfg["score"]), sub_scores(q2, K[:, 1], cfg["score"])
    (v1, i1), (v2, i2) = (r.topk(k, -1) for r in rows)
    pair_sums = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)  # [B,C,H,k*k]
    s, pick = pair_sums.topk(k, -1)
    idx = i1.gather(-1, pick // k) * n + i2.gather(-1, pick % k)
    w = read_weights(s / cfg["temperature"], cfg["score_fn"])
    return torch.einsum("bchk,bchkd->bcd", w, V[idx]), idx, rows


def read_weights(t, score_fn):
    """Weights of the H*k reads of each token from their scaled scores t [B,C,H,k]."""
    if score_fn == "softmax":  # over all heads' reads together
        return torch.softmax(t.flatten(-2), -1).view_as(t)
    return F.silu(t) if score_fn == "silu" else F.relu(t)


def write(K, V, out, idx, rows, v, gates, mask, cfg):
    """One chunk's gradient step on the fast weights: the new (K, V). ``out``, ``v``, ``gates``
    and ``mask`` cover the chunk's P positions with a target; ``idx`` and ``rows`` its whole read."""
    mem_loss = memorisation_loss(out, v, gates, mask)
    gV = torch.autograd.grad(mem_loss, V, create_graph=True, retain_graph=True)[0]  # dense [N, dv]
    if cfg["mse"] == "sum":  # the mean loss's gradient times S / N_read per slot
        n_read = torch.bincount(idx.reshape(-1), minlength=V.shape[0]).clamp_min(1).to(gV.dtype)
        n_samples = (mask > 0).sum() if mask is not None else idx.shape[0] * idx.shape[1]
        gV = gV * (n_samples * cfg["v_dim"] * cfg["topk"] * cfg["heads"]) / n_read.unsqueeze(-1)
    V = descend(V, gV, cfg)  # a new dense copy of the table every chunk
    if cfg["addr_loss_weight"] or not cfg["grad_to_values_only"]:
        gK = torch.autograd.grad(key_loss(mem_loss, rows, cfg), K, create_graph=True, retain_graph=True)[0]
        K = descend(K, gK, cfg)
    return K, V


def memorisation_loss(out, v, gates, mask):
    """0.5 * the mean over positions of the (masked, gated) mean squared read error."""
    e = ((out - v) ** 2).mean(-1)
    if mask is not None:
        e = e * mask
    if gates is not None:
        e = e * gates
    return 0.5 * e.mean()


def key_loss(mem_loss, rows, cfg):
    """What the keys descend: the addressing loss, plus the memorisation loss unless grad_to_values_only."""
    a, k = cfg["addr_loss_weight"], cfg["topk"]
    addr_loss = -a * (marginal_entropy(rows[0], k) + marginal_entropy(rows[1], k)) if a else 0.0 * mem_loss
    return addr_loss if cfg["grad_to_values_only"] else mem_loss + addr_loss


def marginal_entropy(rows, k):
    """rows [..., n]: keep each row's top-k (others -inf), softmax, average, entropy."""
    n = rows.shape[-1]
    top, ids = rows.topk(k, -1)
    masked = torch.full_like(rows, float("-inf")).scatter(-1, ids, top)
    p_bar = torch.softmax(masked, -1).reshape(-1, n).mean(0)
    return -(p_bar * torch.log(p_bar + 1e-8)).sum()


def descend(x, grad, cfg):
    """One step of gradient descent with weight decay (the gradient clipped to [-1, 1] if grad_clip)."""
    if cfg["grad_clip"]:
        grad = grad.clamp(-1, 1)
    return x - cfg["lr"] * (grad + cfg["weight_decay"] * x)
