"""The FwPKM memory core against the dense reference of the spec (fwpkm.naive)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fwpkm import ConfigError, FwPKMMemory, MemoryConfig

GRID = list(itertools.product(["idw", "dot"], [0, 1], [1.0, None], [True, False], ["sum", "mean"], [False, True]))


@pytest.mark.parametrize("score,lookahead,addr,values_only,mse,gated_masked", GRID)
def test_matches_dense_reference(make_memory, memory_inputs, compare_with_reference, score, lookahead, addr,
                                 values_only, mse, gated_masked):
    mem = make_memory(score=score, lookahead=lookahead, addr_loss_weight=addr, grad_to_values_only=values_only, mse=mse)
    compare_with_reference(mem, *memory_inputs(mem, gated=gated_masked, masked=gated_masked))


@pytest.mark.parametrize("overrides", [
    dict(weight_decay=0.1, lr=0.5),
    dict(grad_clip=True),
    dict(score_fn="silu", temperature=2.0),
    dict(score_fn="relu", score="dot"),
    dict(heads=1, topk=6, lookahead=2),
    dict(addr_loss_weight=0.0, grad_to_values_only=True),
    dict(grad_clip=True, weight_decay=0.05, grad_to_values_only=False, mse="mean"),
])
def test_matches_reference_other_options(make_memory, memory_inputs, compare_with_reference, overrides):
    mem = make_memory(**overrides)
    compare_with_reference(mem, *memory_inputs(mem, gated=True))


def test_reference_chunk_size_per_call_and_shorter_last_chunk(make_memory, memory_inputs, compare_with_reference):
    mem = make_memory()
    compare_with_reference(mem, *memory_inputs(mem, T=11), chunk=4)  # chunks 4, 4, 3


@pytest.mark.parametrize("addr,values_only", list(itertools.product([1.0, None], [True, False])))
def test_eval_mode_same_values_no_graph(make_memory, memory_inputs, addr, values_only):
    mem = make_memory(addr_loss_weight=addr, grad_to_values_only=values_only)
    q, v, g, _ = memory_inputs(mem, gated=True)
    state = {k: t.clone() for k, t in mem.state_dict().items()}
    train_out = mem.train()(q, v, g).output
    train_state = {k: t.clone() for k, t in mem.state_dict().items()}
    mem.load_state_dict(state)
    with torch.no_grad():  # as in Lightning's validation
        eval_out = mem.eval()(q, v, g).output
    assert not eval_out.requires_grad
    torch.testing.assert_close(eval_out, train_out.detach())
    for k in state:
        torch.testing.assert_close(mem.state_dict()[k], train_state[k])


def test_meta_gradients_match_finite_differences(make_memory, memory_inputs):
    mem = make_memory(heads=1, topk=2, n_subkeys=4, k_dim=4, v_dim=3, chunk_size=3, score="dot")
    q, v, g, _ = memory_inputs(mem, B=1, T=7, gated=True)
    saved = {k: t.clone() for k, t in mem.state_dict().items()}

    def f(q, v, g):
        mem.load_state_dict(saved)  # every evaluation starts from the same fast weights
        return mem.train()(q, v, g).output

    assert torch.autograd.gradcheck(f, (q, v, g), eps=1e-6, atol=1e-6, rtol=1e-5)


SPARSE_GRAPH_CONFIGS = [
    dict(),
    dict(score="dot", lookahead=0, addr_loss_weight=None, mse="mean"),
    dict(weight_decay=0.1, lr=0.5),
    dict(grad_clip=True),  # its updates are clipped: no recipe, rows of the delta itself
    dict(grad_to_values_only=False),  # the reads are differentiated twice: the table keeps its graph
]


@pytest.mark.parametrize("overrides", SPARSE_GRAPH_CONFIGS)
@pytest.mark.parametrize("sparse_below", [0.0, 2.0])
def test_graph_through_earlier_writes_dense_or_row_by_row(make_memory, memory_inputs, compare_with_reference,
                                                          monkeypatch, overrides, sparse_below):
    """A chunk reading rows earlier chunks wrote differentiates through those writes either with
    one [U, dv] gradient (sparse_below 0) or only at the rows hit (2: always); both are exact."""
    from fwpkm import memory as memory_module
    from kernels import ops

    monkeypatch.setattr(memory_module, "SPARSE_BELOW", sparse_below)
    calls = []
    scatter_rows_at = ops.scatter_rows_at
    monkeypatch.setattr(ops, "scatter_rows_at", lambda *a: calls.append(1) or scatter_rows_at(*a))
    mem = make_memory(**overrides)
    compare_with_reference(mem, *memory_inputs(mem, T=17, gated=True, masked=True), chunk=4)
    row_by_row = sparse_below > 1 and not overrides.get("grad_clip")
    assert bool(calls) == row_by_row


def test_meta_gradients_through_rows_hit_match_finite_differences(make_memory, memory_inputs, monkeypatch):
    from fwpkm import memory as memory_module

    monkeypatch.setattr(memory_module, "SPARSE_BELOW", 2.0)
    mem = make_memory(heads=1, topk=2, n_subkeys=4, k_dim=4, v_dim=3, chunk_size=3, weight_decay=0.2)
    q, v, g, _ = memory_inputs(mem, B=1, T=8, gated=True)
    saved = {k: t.clone() for k, t in mem.state_dict().items()}

    def f(q, v, g):
        mem.load_state_dict(saved)
        return mem.train()(q, v, g).output

    assert torch.autograd.gradcheck(f, (q, v, g), eps=1e-6, atol=1e-6, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 22), max_size=5, unique=True), training=st.booleans(), chunk=st.integers(2, 7))
def test_streaming_equals_one_shot(make_memory, memory_inputs, cuts, training, chunk):
    mem = make_memory(chunk_size=chunk)
    mem.train(training)
    q, v, g, m = memory_inputs(mem, T=23, gated=True, masked=True)
    saved = {k: t.clone() for k, t in mem.state_dict().items()}
    one_shot = mem(q, v, g, m).output.detach()
    final = {k: t.clone() for k, t in mem.state_dict().items()}

    mem.load_state_dict(saved)
    stream = mem.new_stream()
    bounds = [0, *sorted(cuts), 23]
    pieces = [mem(q[:, a:b], v[:, a:b], g[:, a:b], m[:, a:b], stream=stream).output.detach()
              for a, b in zip(bounds, bounds[1:]) if b > a]
    mem.flush(stream)
    torch.testing.assert_close(torch.cat(pieces, 1), one_shot, rtol=1e-10, atol=1e-12)
    for k in final:
        torch.testing.assert_close(mem.state_dict()[k], final[k], rtol=1e-10, atol=1e-12)


def test_stream_keeps_pending_tail_until_flush(make_memory, memory_inputs):
    mem = make_memory(chunk_size=5).eval()
    q, v, _, _ = memory_inputs(mem, T=7)
    stream = mem.new_stream()
    before = mem.values.clone()
    mem(q[:, :3], v[:, :3], stream=stream)
    assert torch.equal(mem.values, before) and stream.pending_len == 3
    mem(q[:, 3:7], v[:, 3:7], stream=stream)  # completes chunk one (5 tokens), 2 pending
    assert not torch.equal(mem.values, before) and stream.pending_len == 2
    after_chunk = mem.values.clone()
    mem.flush(stream)
    assert stream.pending_len == 0 and not torch.equal(mem.values, after_chunk)


def test_memorisation_passes_reduce_read_error():
    """Write random key -> value pairs (lookahead 0) and read them back: error falls each pass."""
    torch.manual_seed(0)
    config = MemoryConfig(heads=1, topk=8, n_subkeys=32, k_dim=32, v_dim=16, chunk_size=64, lookahead=0)
    mem = FwPKMMemory(config).eval()
    q = torch.randn(1, 64, 32)
    v = torch.randn(1, 64, 16)
    v = (v - v.mean(-1, keepdim=True)) / v.std(-1, keepdim=True)
    errors = [(mem(q, v).output - v).pow(2).mean().item() for _ in range(4)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0], errors


def test_state_is_buffer_not_parameter_and_persists(make_memory, memory_inputs):
    mem = make_memory()
    assert list(mem.parameters()) == []
    assert {"keys", "values"} <= set(mem.state_dict())
    q, v, _, _ = memory_inputs(mem)
    before = mem.values.clone()
    mem.eval()(q, v)
    assert not torch.equal(mem.values, before)  # persists across calls
    mem.values = torch.zeros_like(mem.values)  # assignable
    assert mem.state_dict()["values"].abs().sum() == 0
    mem.reset_state()
    assert mem.values.std() > 0


def test_only_read_rows_change(make_memory, memory_inputs):
    mem = make_memory(n_subkeys=16, addr_loss_weight=None).eval()
    q, v, _, _ = memory_inputs(mem, T=5)
    before = mem.values.clone()
    out = mem(q, v, chunk_size=5)
    changed = (mem.values != before).any(-1).nonzero().flatten()
    assert set(changed.tolist()) <= set(out.indices.flatten().tolist())


def test_state_stays_float32_in_half_precision_model(memory_config):
    mem = FwPKMMemory(memory_config()).to(torch.bfloat16)
    assert mem.values.dtype == torch.float32 and mem.keys.dtype == torch.float32
    out = mem(torch.randn(1, 6, 12, dtype=torch.bfloat16), torch.randn(1, 6, 5, dtype=torch.bfloat16))
    assert out.output.dtype == torch.bfloat16


def test_no_addressing_loss_keeps_keys_unchanged(make_memory, memory_inputs):
    mem = make_memory(addr_loss_weight=None, grad_to_values_only=True)
    keys = mem.keys.clone()
    q, v, _, _ = memory_inputs(mem)
    mem.train()(q, v).output.sum().backward()
    assert torch.equal(mem.keys, keys)


def test_diagnostics_reported(make_memory, memory_inputs):
    mem = make_memory()
    out = mem(*memory_inputs(mem)[:2])
    for key in ("mem_loss", "addr_loss", "collision_ratio", "coverage_ratio", "kl_to_uniform",
                "effective_reads", "grad_norm_values", "grad_norm_keys"):
        assert torch.isfinite(out.stats[key]), key
    assert out.indices.shape == (2, 13, 2, 3) and out.weights.shape == (2, 13, 2, 3)
    assert 0 <= out.stats["coverage_ratio"] <= 1 and 0 <= out.stats["collision_ratio"] < 1
    assert 1 < out.stats["effective_reads"] < 2 * 3  # between one-hot and uniform over H*k = 6 reads


@pytest.mark.parametrize("temperature,expected", [(1e-6, 1.0), (1e6, 6.0)])
def test_effective_reads_spans_one_hot_to_uniform(make_memory, memory_inputs, temperature, expected):
    mem = make_memory(temperature=temperature)
    out = mem(*memory_inputs(mem)[:2])
    assert out.stats["effective_reads"].item() == pytest.approx(expected, rel=1e-4)


def test_idw_reads_turn_uniform_when_queries_are_far_from_every_key(make_memory, memory_inputs):
    """-log(1e-3 + |q - key|^2) barely differs between keys once |q| dwarfs them: the diagnosis
    that ``effective_reads`` exists to catch (block.query_compression=l2norm prevents it)."""
    mem = make_memory(score="idw", heads=1)  # one head: with several, |q| differs between heads' scores
    q, v, _, _ = memory_inputs(mem)
    near = mem(q, v).stats["effective_reads"].item()
    mem = make_memory(score="idw", heads=1)
    far = mem(q * 1e3, v).stats["effective_reads"].item()
    assert near < 2.9 and far == pytest.approx(3.0, rel=1e-4)


@pytest.mark.parametrize("kwargs,option", [
    (dict(k_dim=7), "k_dim"),
    (dict(topk=10, n_subkeys=8), "topk"),
    (dict(lookahead=5, chunk_size=5), "lookahead"),
    (dict(score="cosine"), "score"),
    (dict(mse="median"), "mse"),
    (dict(score_fn="tanh"), "score_fn"),
])
def test_config_errors_name_the_option(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        MemoryConfig(**kwargs)


def test_bad_shapes_are_clear_errors(make_memory):
    mem = make_memory()
    with pytest.raises(ValueError, match="gates must be"):
        mem(torch.randn(2, 4, 12), torch.randn(2, 4, 5), gates=torch.rand(2, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        mem(torch.randn(2, 4, 12), torch.randn(2, 4, 5), chunk_size=1)


def test_inference_mode_gives_the_no_grad_result(make_memory, memory_inputs):
    mem = make_memory()
    q, v, g, _ = memory_inputs(mem, gated=True)
    saved = {k: t.clone() for k, t in mem.state_dict().items()}
    with torch.no_grad():
        expected = mem.eval()(q, v, g).output
    mem.load_state_dict(saved)
    with torch.inference_mode():
        got = mem(q, v, g).output
    torch.testing.assert_close(got, expected)


def test_train_topk_reads_wider_in_training_only(make_memory, memory_inputs):
    """memory.train_topk: a training call is the call of a memory whose topk is train_topk (reads, writes and
    meta-gradients; that one matches the dense reference above), an evaluation call the one of plain topk."""
    wide, narrow = 4, 2
    mem = make_memory(topk=narrow, train_topk=wide)
    as_wide, as_narrow = make_memory(topk=wide), make_memory(topk=narrow)
    q, v, gates, mask = memory_inputs(mem, gated=True)
    outs = []
    for m in (mem, as_wide):
        m.train()
        out = m(q, v, gates, mask).output
        outs.append((out, m.keys.clone(), m.values.clone(), torch.autograd.grad(out.pow(2).sum(), (q, v, gates))))
    for got, want in zip(outs[0][:3], outs[1][:3]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for got, want in zip(outs[0][3], outs[1][3]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    mem.load_state_dict(as_narrow.state_dict())  # the same fast weights again
    with torch.no_grad():
        got, want = mem.eval()(q, v).output, as_narrow.eval()(q, v).output
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    trained_narrow = make_memory(topk=narrow).train()(q, v, gates, mask).output
    assert not torch.allclose(outs[0][0], trained_narrow)  # the widths differ: the test can tell them apart


def test_train_topk_outside_topk_and_n_subkeys_is_a_clear_error():
    with pytest.raises(ConfigError, match="memory.train_topk=4 must be null or between memory.topk=8"):
        MemoryConfig(train_topk=4)
    with pytest.raises(ConfigError, match="train_topk"):
        MemoryConfig(topk=2, n_subkeys=6, train_topk=7)
