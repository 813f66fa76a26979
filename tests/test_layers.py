import math

import pytest
import torch
import torch.nn.functional as F

from fwpkm.config import AttentionConfig, GDNConfig, PKMConfig
from fwpkm.layers import (
    Attention,
    GatedDeltaNet,
    ProductKeyMemory,
    RMSNorm,
    SwiGLU,
    apply_rope,
    fla_chunk_gated_delta_rule,
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
    rope_cos_sin,
)

D_MODEL = 32
DT = torch.float64


def attn(window=None, n_heads=4, n_kv_heads=2, seed=0):
    torch.manual_seed(seed)
    cfg = AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=8, window=window or 1)
    return Attention(D_MODEL, cfg, window=window).to(DT)


def gdn(seed=0):
    torch.manual_seed(seed)
    return GatedDeltaNet(D_MODEL, GDNConfig(n_heads=2, head_dim=8, conv_size=4)).to(DT)


def rand_x(B=2, T=40, seed=1):
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=DT)


def rand_gdr_inputs(B=2, T=37, H=3, K=8, V=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=DT), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=DT), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=DT)
    g = -F.softplus(torch.randn(B, T, H, generator=gen, dtype=DT))
    beta = torch.rand(B, T, H, generator=gen, dtype=DT)
    s0 = torch.randn(B, H, K, V, generator=gen, dtype=DT)
    return q, k, v, g, beta, s0


# ----------------------------------------------------------------------------- norms, FFN, RoPE


def test_rmsnorm_zero_weight_is_plain_rms_normalisation():
    x = torch.randn(3, 5, 16, dtype=DT)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(RMSNorm(16).to(DT)(x), expected)
    x32 = x.float()
    assert RMSNorm(16)(x32).dtype == torch.float32


def test_rmsnorm_weight_is_applied_as_one_plus_w():
    norm = RMSNorm(16).to(DT)
    with torch.no_grad():
        norm.weight.fill_(0.5)
    x = torch.randn(4, 16, dtype=DT)
    torch.testing.assert_close(norm(x), 1.5 * RMSNorm(16).to(DT)(x))


def test_swiglu_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(D_MODEL, 24).to(DT)
    x = rand_x()
    expected = ffn.down.weight @ (F.silu(ffn.gate.weight @ x[..., None]) * (ffn.up.weight @ x[..., None]))
    torch.testing.assert_close(ffn(x), expected.squeeze(-1))


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(2, 8, dtype=DT).unbind(0)
    def score(m, n):
        cm, sm = rope_cos_sin(torch.tensor([m]), 8, 10000.0)
        cn, sn = rope_cos_sin(torch.tensor([n]), 8, 10000.0)
        return (apply_rope(q[None], cm, sm) * apply_rope(k[None], cn, sn)).sum()
    torch.testing.assert_close(score(7, 3), score(104, 100))
    torch.testing.assert_close(score(0, 0), (q * k).sum())
    assert not torch.allclose(score(7, 3), score(7, 4))


# ----------------------------------------------------------------------------- attention


def naive_attention(layer: Attention, x: torch.Tensor, window):
    """Explicit per-query softmax over the allowed keys, kv heads repeated by hand."""
    B, T, _ = x.shape
    H, Hkv, Dh = layer.n_heads, layer.n_kv_heads, layer.head_dim
    cos, sin = rope_cos_sin(torch.arange(T), Dh, layer.rope_theta)
    q = apply_rope(layer.q_proj(x).view(B, T, H, Dh).transpose(1, 2), cos, sin)
    k = apply_rope(layer.k_proj(x).view(B, T, Hkv, Dh).transpose(1, 2), cos, sin)
    v = layer.v_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    out = torch.zeros_like(q)
    for t in range(T):
        lo = 0 if window is None else max(0, t - window + 1)
        scores = q[:, :, t : t + 1] @ k[:, :, lo : t + 1].transpose(-1, -2) / math.sqrt(Dh)
        out[:, :, t] = (scores.softmax(-1) @ v[:, :, lo : t + 1]).squeeze(2)
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, H * Dh))


@pytest.mark.parametrize("window", [None, 1, 5])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_attention_matches_naive_reference(window, n_kv_heads):
    layer, x = attn(window, n_kv_heads=n_kv_heads), rand_x(T=23)
    torch.testing.assert_close(layer(x), naive_attention(layer, x, window))


def test_swa_ignores_tokens_outside_the_window():
    window, t = 6, 20
    x = rand_x(T=24)
    x2 = x.clone()
    x2[:, : t - window + 1] += 3.0  # tokens t-window and earlier
    swa = attn(window)
    torch.testing.assert_close(swa(x2)[:, t:], swa(x)[:, t:])
    assert not torch.allclose(swa(x2)[:, t - 1], swa(x)[:, t - 1])  # token t-window is in t-1's window
    full = attn(None)
    assert not torch.allclose(full(x2)[:, t:], full(x)[:, t:])


def test_window_override():
    x = rand_x(T=20)
    swa, full = attn(4), attn(None)  # same seed -> same weights
    torch.testing.assert_close(swa(x, window=None), full(x))
    torch.testing.assert_close(full(x, window=4), swa(x))
    torch.testing.assert_close(full(x, window=4), naive_attention(full, x, 4))


@pytest.mark.parametrize("make", [lambda: attn(None), lambda: attn(5), gdn], ids=["full", "swa", "gdn"])
def test_mixers_are_causal(make):
    layer, x = make(), rand_x(T=30)
    y = layer(x)
    for t in (0, 9, 28):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
        y2 = layer(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1])
        assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])


def random_splits(T, n_pieces, seed):
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(T - 1, generator=gen)[: n_pieces - 1].add(1).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [T])]


@pytest.mark.parametrize(
    "make", [lambda: attn(None), lambda: attn(5), lambda: attn(1), gdn], ids=["full", "swa", "swa1", "gdn"]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_pieces_equal_one_call(make, seed):
    layer, x = make(), rand_x(T=150, seed=seed)
    expected = layer(x)
    cache = layer.new_cache()
    sizes = random_splits(148, 6, seed) + [1, 1]  # end with single-token steps
    outs, start = [], 0
    for n in sizes:
        outs.append(layer(x[:, start : start + n], cache=cache))
        start += n
    torch.testing.assert_close(torch.cat(outs, 1), expected)


def test_swa_cache_is_trimmed():
    layer = attn(5)
    cache = layer.new_cache()
    layer(rand_x(T=30), cache=cache)
    assert cache.k.shape[2] <= 5 and cache.pos == 30


# ----------------------------------------------------------------------------- gated delta rule


@pytest.mark.parametrize("chunk_size", [8, 16, 64])
def test_chunked_gated_delta_rule_matches_recurrent(chunk_size):
    inputs = [t.requires_grad_() for t in rand_gdr_inputs()]
    q, k, v, g, beta, s0 = inputs
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=s0)
    o, s = gated_delta_rule_chunked(q, k, v, g, beta, initial_state=s0, chunk_size=chunk_size)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)

    do, ds = torch.randn_like(o), torch.randn_like(s)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), inputs)
    grads = torch.autograd.grad((o * do).sum() + (s * ds).sum(), inputs)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_gated_delta_rule_without_initial_state_and_strong_decay():
    q, k, v, g, beta, _ = rand_gdr_inputs(T=20)
    g = g * 20  # decays down to exp(-100): no overflow in the chunked form
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta)
    o, s = gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=8)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)


def test_delta_rule_stores_and_recalls_a_key():
    # beta = 1, no decay: after writing (k, v), reading with q = k returns v exactly.
    K = 4
    k = torch.eye(K, dtype=DT)[None, :, None]  # orthogonal keys [1, K, 1, K]
    v = torch.randn(1, K, 1, 3, dtype=DT)
    o, _ = gated_delta_rule_chunked(k, k, v, torch.zeros(1, K, 1, dtype=DT), torch.ones(1, K, 1, dtype=DT), scale=1.0)
    torch.testing.assert_close(o, v)


@pytest.mark.skipif(fla_chunk_gated_delta_rule is None or not torch.cuda.is_available(), reason="needs fla and CUDA")
def test_fla_kernel_matches_torch_path():
    q, k, v, g, beta, s0 = (t.float().cuda() for t in rand_gdr_inputs(T=100, K=16, V=16))
    o_ref, s_ref = gated_delta_rule_chunked(q, k, v, g, beta, initial_state=s0)
    o, s = fla_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(o, o_ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(s, s_ref, atol=2e-3, rtol=2e-3)


def test_gdn_float32_close_to_float64():
    layer, x = gdn(), rand_x(T=70)
    y64 = layer(x)
    y32 = layer.float()(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- PKM

PKM_CFG = PKMConfig(heads=2, topk=3, n_subkeys=6, k_dim=8, v_dim=10)


def pkm(seed=0):
    torch.manual_seed(seed)
    return ProductKeyMemory(D_MODEL, PKM_CFG).to(DT)


def dense_pkm(mem: ProductKeyMemory, x):
    """Full n*n score matrix per head, exact top-k, softmax, weighted sum of values, heads summed."""
    B, T, _ = x.shape
    H, n, k, dk = mem.heads, mem.n_subkeys, mem.topk, mem.k_dim
    q = mem.query_norm(mem.query(x).view(B, T, H, dk))
    read = torch.zeros(B, T, mem.v_dim, dtype=x.dtype)
    for h in range(H):
        s1 = q[..., h, : dk // 2] @ mem.subkeys[h, 0].T  # [B, T, n]
        s2 = q[..., h, dk // 2 :] @ mem.subkeys[h, 1].T
        full = (s1[..., :, None] + s2[..., None, :]).reshape(B, T, n * n)  # slot i*n + j
        scores, slots = full.topk(k, dim=-1)
        read = read + (scores.softmax(-1)[..., None] * mem.values[slots]).sum(-2)
    return mem.out(read)


def test_pkm_matches_dense_reference():
    mem, x = pkm(), rand_x(T=11)
    y = mem(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, dense_pkm(mem, x))


def test_pkm_gradients_reach_subkeys_and_values():
    mem, x = pkm(), rand_x(T=11)
    mem(x).pow(2).sum().backward()
    assert mem.subkeys.grad.abs().sum() > 0 and mem.values.grad.abs().sum() > 0
    assert mem.query.weight.grad.abs().sum() > 0
    slots, _ = mem.lookup(x)
    unread = torch.ones(mem.n_subkeys**2, dtype=torch.bool)
    unread[slots.flatten()] = False
    assert (mem.values.grad[unread] == 0).all()  # only read slots get a gradient


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    "make",
    [lambda: attn(None), lambda: attn(5), gdn, pkm, lambda: SwiGLU(D_MODEL, 24), lambda: RMSNorm(D_MODEL)],
    ids=["full", "swa", "gdn", "pkm", "swiglu", "rmsnorm"],
)
def test_float32_and_bf16_autocast(make):
    layer = make().float()
    x = rand_x(T=20).float().requires_grad_()
    assert layer(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
