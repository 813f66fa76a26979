"""The fast-weight block, the FwMLP baseline and the hybrid model."""

from __future__ import annotations

import itertools

import pytest
import torch

from fwpkm import (BlockConfig, ConfigError, FastWeightBlock, FwMLPMemory, HybridLM, ModelConfig, preset,
                   preset_names)
from fwpkm.config import FwMLPConfig


TINY_PRESETS = [n for n in preset_names() if n.startswith("tiny-")]


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_every_tiny_preset_trains_a_step_and_is_causal(micro_config, name):
    torch.manual_seed(0)
    model = HybridLM(micro_config(name)).double().train()
    x = torch.randint(0, 50, (2, 21))
    saved = model.fast_weight_state()
    out = model(x, labels=x)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    t = 11
    perturbed = x.clone()
    perturbed[:, t + 1:] = torch.randint(0, 50, perturbed[:, t + 1:].shape)
    model.load_fast_weight_state(saved)
    with torch.no_grad():
        a = model(x).logits
    model.load_fast_weight_state(saved)
    with torch.no_grad():
        b = model(perturbed).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_paper_presets_have_the_paper_layout():
    base = preset("paper")
    assert base.mixers == ["gdn"] * 3 + ["swa"] + ["gdn"] * 3 + ["swa"] + ["gdn"] * 3 + ["swa"]
    assert base.pkm_layers == [6] and base.memory_layers == [2, 10] and base.d_model == 768
    assert preset("paper-gdn-fwpkm").memory_layers == [2, 6, 10]
    fwmlp = preset("paper-fa-fwmlp")
    assert fwmlp.block.kind == "fwmlp" and fwmlp.memory_layers == [2, 6, 10] and set(fwmlp.mixers) == {"fa"}
    assert preset("paper-fa_interleave").mixers[3] == "fa" and preset("paper-fa_interleave").memory_layers == []


@pytest.mark.parametrize("name", ["tiny-swa_interleave-pkm-fwpkm", "tiny-fa-fwmlp"])
def test_model_streaming_equals_one_shot(micro_config, name):
    torch.manual_seed(0)
    model = HybridLM(micro_config(name)).double().eval()
    x = torch.randint(0, 50, (2, 30))
    saved = model.fast_weight_state()
    with torch.no_grad():
        one_shot = model(x).logits
    final = model.fast_weight_state()
    model.load_fast_weight_state(saved)
    cache = model.new_cache()
    with torch.no_grad():
        pieces = [model(x[:, a:b], cache=cache).logits for a, b in [(0, 5), (5, 6), (6, 19), (19, 30)]]
    model.flush(cache)
    torch.testing.assert_close(torch.cat(pieces, 1), one_shot)
    for k, t in model.fast_weight_state().items():
        torch.testing.assert_close(t, final[k])


def test_fa_to_swa_limits_attention_to_the_chunk(micro_config):
    torch.manual_seed(0)
    model = HybridLM(micro_config("tiny-fa")).double().eval()  # no memory: only attention carries context
    x = torch.randint(0, 50, (1, 30))
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % 50
    with torch.no_grad():
        far = lambda inp, swa: model(inp, fa_to_swa=swa).logits[0, -1]
        assert torch.allclose(far(x, True), far(y, True))  # token 0 is outside every window of size 8
        assert not torch.allclose(far(x, False), far(y, False))


def fwmlp_reference(weights, q, v, gates, cfg):
    """Spec section 3, dense and literal."""
    W = {k: t.clone().requires_grad_(True) for k, t in weights.items()}
    outs = []
    for s in range(0, q.shape[1], cfg.chunk_size):
        e = min(q.shape[1], s + cfg.chunk_size)
        h = torch.nn.functional.silu(q[:, s:e] @ W["w_gate"].T + W["b_gate"]) * (q[:, s:e] @ W["w_up"].T + W["b_up"])
        out = h @ W["w_down"].T + W["b_down"]
        outs.append(out)
        P = e - s - cfg.lookahead
        if P <= 0:
            continue
        loss = 0.5 * (((out[:, :P] - v[:, s + cfg.lookahead:e]) ** 2).mean(-1) * gates[:, s:s + P]).mean()
        grads = torch.autograd.grad(loss, list(W.values()), create_graph=True)
        W = {k: w - cfg.lr * g for (k, w), g in zip(W.items(), grads)}
    return torch.cat(outs, 1), W


@pytest.mark.parametrize("lookahead", [0, 1])
def test_fwmlp_matches_dense_reference(lookahead):
    torch.manual_seed(0)
    cfg = FwMLPConfig(hidden=7, k_dim=4, v_dim=3, chunk_size=4, lookahead=lookahead)
    mem = FwMLPMemory(cfg).double().train()
    q = torch.randn(2, 10, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 10, 3, dtype=torch.float64, requires_grad=True)
    g = torch.rand(2, 10, dtype=torch.float64, requires_grad=True)
    initial = {k: t.clone() for k, t in mem.state_dict().items()}
    out = mem(q, v, g).output
    ref_out, ref_w = fwmlp_reference(initial, q, v, g, cfg)
    torch.testing.assert_close(out, ref_out)
    for k, w in ref_w.items():
        torch.testing.assert_close(getattr(mem, k), w.detach())
    probe = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad((out * probe).sum(), (q, v, g)),
                         torch.autograd.grad((ref_out * probe).sum(), (q, v, g))):
        torch.testing.assert_close(got, want)


def block_input(seed=0):
    torch.manual_seed(seed)
    return torch.randn(2, 12, 32, dtype=torch.float64)


@pytest.mark.parametrize("fuse,weight,residual", list(itertools.product([True, False], repeat=3)))
def test_block_gate_and_residual_switches(micro_config, fuse, weight, residual):
    cfg = micro_config().block
    cfg = BlockConfig(**(cfg.__dict__ | dict(out_fuse_gate=fuse, weight_loss_with_gates=weight,
                                              residual_value=residual)))
    block = FastWeightBlock(32, cfg).double()
    h = block_input()
    out, mo = block(h)
    assert out.shape == h.shape and torch.isfinite(out).all()
    assert (mo.gates is not None) == (fuse or weight)
    assert hasattr(block, "g_proj") == (fuse or weight)


@pytest.mark.parametrize("compression,target", [("l2norm", "l2norm"), ("zero_mean", "none"), ("none", "zero_mean")])
def test_block_query_compression_and_target_norm(micro_config, compression, target):
    cfg = BlockConfig(**(micro_config().block.__dict__ | dict(query_compression=compression, target_norm=target)))
    block = FastWeightBlock(32, cfg).double()
    h = block_input()
    q = block._compress(block.q_proj(block.q_norm(h))).unflatten(-1, (2, -1))
    if compression == "l2norm":
        torch.testing.assert_close(q.norm(dim=-1), torch.ones_like(q[..., 0]))
    if compression == "zero_mean":
        torch.testing.assert_close(q.mean(-1), torch.zeros_like(q[..., 0]))
    v = block._normalise_target(block.v_proj(block.v_norm(h)))
    if target == "zero_mean":
        torch.testing.assert_close(v.mean(-1), torch.zeros_like(v[..., 0]))


def test_fast_weights_are_not_parameters(micro_config):
    model = HybridLM(micro_config())
    params = {id(p) for p in model.parameters()}
    for mem in model.fast_weight_memories().values():
        assert all(id(b) not in params for b in mem.buffers())
    assert any(k.endswith("memory.memory.values") for k in model.state_dict())


@pytest.mark.parametrize("change,option", [
    (dict(mixers=["gdn", "mamba"]), "mixers"),
    (dict(memory_layers=[5]), "memory_layers"),
    (dict(pkm_layers=[-1]), "pkm_layers"),
    (dict(block={"kind": "dense"}), "block.kind"),
    (dict(block={"memory": {"k_dim": 15}}), "k_dim"),
    (dict(attention={"n_heads": 3, "n_kv_heads": 2}), "n_kv_heads"),
    (dict(fa_to_swa_prob=1.5), "fa_to_swa_prob"),
    (dict(colour="blue"), "colour"),
])
def test_invalid_model_configs_fail_at_construction(change, option):
    data = preset("tiny").to_dict() | change
    with pytest.raises(ConfigError, match=option):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize("name,part", [("huge", "scale"), ("tiny-rnn", "mixers"), ("tiny-gdn-fwpkm-fwmlp", "suffix")])
def test_unknown_presets(name, part):
    with pytest.raises(ConfigError, match=part):
        preset(name)
