"""Slow-weight building blocks of the hybrid decoder (spec sections 4-5).

RMSNorm, SwiGLU, RoPE attention (full / sliding-window, GQA), Gated DeltaNet and the
slow-weight product-key memory. Every module maps [B, T, d_model] -> [B, T, d_model].
The token mixers stream: ``new_cache()`` returns a cache object that ``forward`` updates
in place, and feeding a sequence in pieces gives the same output as one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fwpkm.config import AttentionConfig, GDNConfig, PKMConfig

try:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule
except Exception:  # fla is optional (and needs triton); the torch path below is the reference
    fla_chunk_gated_delta_rule = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (tests); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # applied as (1 + weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = compute_dtype(x.dtype)
        h = x.to(dt)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.to(dt))).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


# ----------------------------------------------------------------------------- RoPE


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim/2] for integer ``positions`` [T].

    Angles are formed in float64 so that long streams (positions ~1e5) keep their precision.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [..., T, head_dim] with tables [T, head_dim/2]."""
    dt = compute_dtype(x.dtype)
    x1, x2 = x.to(dt).chunk(2, dim=-1)
    cos, sin = cos.to(dt), sin.to(dt)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


# ----------------------------------------------------------------------------- attention


@dataclass
class AttentionCache:
    """Past keys (RoPE applied) and values [B, n_kv_heads, S, head_dim] and the stream position."""

    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    pos: int = 0  # tokens seen so far = position of the next token


_LAYER_WINDOW = object()  # sentinel: use the layer's own window


def attention_mask(n_queries: int, n_keys: int, window: Optional[int], device) -> torch.Tensor:
    """Boolean [n_queries, n_keys] mask (True = attend); the queries are the last n_queries keys.

    Query t sees keys s with t - window < s <= t (all s <= t when window is None).
    """
    q_pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    k_pos = torch.arange(n_keys, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (k_pos > q_pos - window)
    return mask


class Attention(nn.Module):
    """Causal GQA softmax attention with RoPE; ``window=None`` is full attention, an int is SWA."""

    def __init__(self, d_model: int, cfg: AttentionConfig, window: Optional[int] = None):
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"window={window} must be >= 1 or None")
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.window = window
        self.q_proj = nn.Linear(d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, d_model, bias=False)

    def new_cache(self) -> AttentionCache:
        return AttentionCache()

    def forward(self, x: torch.Tensor, cache: Optional[AttentionCache] = None, window=_LAYER_WINDOW) -> torch.Tensor:
        if window is _LAYER_WINDOW:
            window = self.window
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)

        start = cache.pos if cache is not None else 0
        cos, sin = rope_cos_sin(torch.arange(start, start + T, device=x.device), self.head_dim, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:
            if cache.k is not None:
                k, v = torch.cat([cache.k, k.to(cache.k.dtype)], 2), torch.cat([cache.v, v.to(cache.v.dtype)], 2)
            keep = k.shape[2] if window is None else min(k.shape[2], window - 1)
            cache.k, cache.v = k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :]
            cache.pos += T

        y = self.attend(q, k, v, window)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q, k, v, window):
        T, S = q.shape[2], k.shape[2]
        gqa = self.n_kv_heads != self.n_heads
        k, v = k.to(q.dtype), v.to(q.dtype)
        if S == T and (window is None or window >= T):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if gqa:  # the memory-efficient CUDA kernel (needed for masks) has no GQA support
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        mask = attention_mask(T, S, window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ----------------------------------------------------------------------------- gated delta rule
# Layout as in fla: q, k [B, T, H, K], v [B, T, H, V], g (log decay), beta [B, T, H],
# state [B, H, K, V]. Per head: S_t = exp(g_t) S_{t-1}; S_t += beta_t k_t (v_t - S_t^T k_t)^T;
# o_t = scale * S_t^T q_t.


def gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=None, scale=None):
    """Token-by-token reference. Returns (o [B, T, H, V], final_state [B, H, K, V])."""
    B, T, H, K = k.shape
    scale = K**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    out = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        err = v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t])
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * err)
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) * scale)
    return torch.stack(out, 1), S


def gated_delta_rule_chunked(q, k, v, g, beta, initial_state=None, scale=None, chunk_size=64):
    """Chunk-parallel form (WY representation via a unit-triangular solve), same contract as the recurrent one.

    Within a chunk, with G_t = sum_{r<=t} g_r and S0 the state at the chunk start,
    S_t = exp(G_t) S0 + sum_{s<=t} exp(G_t - G_s) k_s u_s^T, where the "new values" u solve
    (I + A) u = beta v - beta exp(G) k S0 with A[t,s] = beta_t exp(G_t - G_s) k_t.k_s for s < t.
    Only the (cheap) state hand-off between chunks is sequential.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    C = min(chunk_size, T)
    pad = (-T) % C
    n = (T + pad) // C

    # Padded tokens have q = k = v = 0, beta = 0, g = 0: they leave the state unchanged.
    def chunks(x):
        x = x.transpose(1, 2)  # [B, H, T, ...]
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
        return x.reshape(B, H, n, C, *x.shape[3:])

    q, k, v, g, beta = map(chunks, (q, k, v, g, beta))
    G = g.cumsum(-1)  # [B, H, n, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # exp(G_t - G_s), s <= t

    kb = k * beta[..., None]
    A = (kb @ k.transpose(-1, -2) * decay).tril(-1)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([v * beta[..., None], kb * G.exp()[..., None]], -1)
    u0, w = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True).split([V, K], -1)
    qk = q @ k.transpose(-1, -2) * decay  # intra-chunk attention, diagonal included
    q_decay = q * G.exp()[..., None]
    k_decay = k * (G[..., -1:] - G).exp()[..., None]  # decay from each token to the chunk end

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
    out = []
    for i in range(n):
        u = u0[:, :, i] - w[:, :, i] @ S
        out.append(q_decay[:, :, i] @ S + qk[:, :, i] @ u)
        S = S * G[:, :, i, -1].exp()[..., None, None] + k_decay[:, :, i].transpose(-1, -2) @ u
    o = torch.stack(out, 2).reshape(B, H, n * C, V)[:, :, :T]
    return o.transpose(1, 2) * scale, S


def gated_delta_rule(q, k, v, g, beta, initial_state=None, scale=None):
    """fla's fused kernel on CUDA when installed, else the chunked torch path (in float32/float64)."""
    if fla_chunk_gated_delta_rule is not None and q.is_cuda and q.dtype != torch.float64:
        dt = v.dtype
        return fla_chunk_gated_delta_rule(
            q.to(dt), k.to(dt), v, g.float(), beta.to(dt),
            scale=scale, initial_state=initial_state, output_final_state=True,
        )  # fmt: skip
    dt = compute_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
        return gated_delta_rule_chunked(q, k, v, g, beta, initial_state=initial_state, scale=scale)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    dt = compute_dtype(x.dtype)
    h = x.to(dt)
    return (h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


@dataclass
class GDNCache:
    """Last conv_size-1 pre-convolution q/k/v inputs [B, 3*H*D, conv_size-1] and the state [B, H, D, D]."""

    conv: Optional[torch.Tensor] = None
    state: Optional[torch.Tensor] = None


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer (Yang et al. 2024), as in fla / Qwen3-Next."""

    def __init__(self, d_model: int, cfg: GDNConfig):
        super().__init__()
        H, D = cfg.n_heads, cfg.head_dim
        self.n_heads, self.head_dim, self.conv_size = H, D, cfg.conv_size
        self.qkv_proj = nn.Linear(d_model, 3 * H * D, bias=False)
        self.conv = nn.Conv1d(3 * H * D, 3 * H * D, cfg.conv_size, groups=3 * H * D, bias=False)
        self.a_proj = nn.Linear(d_model, H, bias=False)
        self.b_proj = nn.Linear(d_model, H, bias=False)
        self.g_proj = nn.Linear(d_model, H * D, bias=False)
        self.o_norm = RMSNorm(D)
        self.o_proj = nn.Linear(H * D, d_model, bias=False)
        # Mamba2-style decay parameters: A in [1, 16], dt in [1e-3, 1e-1] (log-uniform).
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

    def new_cache(self) -> GDNCache:
        return GDNCache()

    def short_conv(self, x: torch.Tensor, cache: Optional[GDNCache]) -> torch.Tensor:
        """Causal depthwise conv + SiLU over time; x [B, T, C]."""
        B, T, C = x.shape
        x = x.transpose(1, 2)
        tail = cache.conv if cache is not None and cache.conv is not None else None
        if tail is None:
            tail = x.new_zeros(B, C, self.conv_size - 1)
        x = torch.cat([tail.to(x.dtype), x], -1)
        if cache is not None:
            cache.conv = x[..., T:]
        return F.silu(F.conv1d(x, self.conv.weight, groups=C)).transpose(1, 2)

    def forward(self, x: torch.Tensor, cache: Optional[GDNCache] = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        q, k, v = self.short_conv(self.qkv_proj(x), cache).view(B, T, 3, H, D).unbind(2)
        q, k = l2norm(q), l2norm(k)

        dt = compute_dtype(x.dtype)
        g = -self.A_log.to(dt).exp() * F.softplus(self.a_proj(x).to(dt) + self.dt_bias.to(dt))
        beta = self.b_proj(x).sigmoid()
        o, state = gated_delta_rule(q, k, v, g, beta, initial_state=None if cache is None else cache.state)
        if cache is not None:
            cache.state = state

        o = self.o_norm(o) * F.silu(self.g_proj(x).view(B, T, H, D))
        return self.o_proj(o.reshape(B, T, H * D))


# ----------------------------------------------------------------------------- slow-weight PKM


class ProductKeyMemory(nn.Module):
    """Product-key memory (Lample et al. 2019) trained by the outer optimizer, used in place of an FFN."""

    def __init__(self, d_model: int, cfg: PKMConfig):
        super().__init__()
        self.heads, self.topk, self.n_subkeys = cfg.heads, cfg.topk, cfg.n_subkeys
        self.k_dim, self.v_dim = cfg.k_dim, cfg.v_dim
        half = cfg.k_dim // 2
        self.query = nn.Linear(d_model, cfg.heads * cfg.k_dim, bias=False)
        self.query_norm = RMSNorm(cfg.k_dim)
        self.subkeys = nn.Parameter(torch.empty(cfg.heads, 2, cfg.n_subkeys, half).uniform_(-(half**-0.5), half**-0.5))
        self.values = nn.Parameter(torch.empty(cfg.n_subkeys**2, cfg.v_dim).normal_(0, cfg.v_dim**-0.5))
        self.out = nn.Linear(cfg.v_dim, d_model, bias=False)

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ids and softmax weights, both [B, T, heads, topk]."""
        B, T, _ = x.shape
        H, k, n = self.heads, self.topk, self.n_subkeys
        q = self.query_norm(self.query(x).view(B, T, H, self.k_dim)).view(B, T, H, 2, self.k_dim // 2)
        sub_scores = torch.einsum("bthsd,hsnd->bthsn", q, self.subkeys.to(q.dtype))  # [B, T, H, 2, n]
        top, idx = sub_scores.topk(k, dim=-1)
        # The exact top-k of all n*n sums lies within the k*k sums of the two top-k lists.
        pair_scores = top[..., 0, :, None] + top[..., 1, None, :]  # [B, T, H, k, k]
        scores, flat = pair_scores.flatten(-2).topk(k, dim=-1)
        i = idx[..., 0, :].gather(-1, flat // k)
        j = idx[..., 1, :].gather(-1, flat % k)
        return i * n + j, scores.softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        slots, weights = self.lookup(x)
        flat = self.heads * self.topk  # one bag per token, all heads together = heads summed
        read = F.embedding_bag(
            slots.reshape(B * T, flat), self.values,
            per_sample_weights=weights.reshape(B * T, flat).to(self.values.dtype), mode="sum",
        )  # fmt: skip
        return self.out(read.view(B, T, self.v_dim))
