"""Kernels of the memory's hot paths (kernels/): each Triton kernel against its PyTorch path,
their gradients to second order, and the whole memory with the Triton backend against the
dense reference of the spec (fwpkm.naive).

Triton kernels run on the CPU with Triton's interpreter: a module fixture sets
TRITON_INTERPRET=1 for these tests only (kernels.triton_ops jits lazily, per interpreter
setting, so the order in which modules imported triton or torch does not matter) and the
tests that need Triton skip, with the reason, when it cannot run.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

try:  # imported before TRITON_INTERPRET is set, as another library may have done: the kernels must cope
    import triton.language  # noqa: F401
except Exception:  # pragma: no cover - triton missing: the Triton tests skip
    pass

from kernels import ops, torch_ops


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton_ops():
    """kernels.triton_ops with TRITON_INTERPRET=1 for the duration of this module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        try:
            from kernels import triton_ops as tops
        except Exception as exc:  # pragma: no cover - depends on the installation
            pytest.skip(f"kernels.triton_ops cannot be imported: {exc!r}")
        if not tops.HAVE_TRITON:
            pytest.skip(f"triton cannot be imported: {tops.IMPORT_ERROR!r}")
        try:  # a tiny probe: the interpreter must actually run a kernel here
            out = tops.weighted_gather(torch.ones(1, 1), torch.full((2, 3), 2.0), torch.tensor([[1]]))
            assert torch.equal(out, torch.full((1, 3), 2.0))
        except Exception as exc:  # pragma: no cover
            pytest.skip(f"triton cannot run kernels in interpreter mode here: {exc!r}")
        yield tops


@pytest.fixture(scope="module")
def cpu_ops():
    """kernels.cpu_ops, compiled (skips where the C++ extension cannot be built)."""
    from kernels import cpu_ops as cops

    if not ops.cpu_kernels_available():
        pytest.skip(f"the C++ kernels cannot be built here: {cops.why_not(torch.device('cpu'))}")
    return cops


AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"  # where the C++ loops' rounding was matched


@pytest.fixture
def count_kernels(triton_ops, monkeypatch):
    """Counts the calls of each Triton kernel wrapper (ops looks them up on the module)."""
    calls = {}
    for name in ("weighted_gather", "row_dot", "scatter_rows", "select_subkeys"):
        fn = getattr(triton_ops, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(triton_ops, name, counted)
    return calls


@pytest.fixture(autouse=True)
def restore_process_backend():
    saved = ops.get_backend()
    yield
    ops.set_backend(saved)


def rows_case(M, P, R, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, R, (M, P), generator=g)
    idx[0, -1] = idx[0, 0]  # a row read twice by the same reader
    w = torch.randn(M, P, generator=g, dtype=dtype)
    table = torch.randn(R, D, generator=g, dtype=dtype)
    x = torch.randn(M, D, generator=g, dtype=dtype)
    scale = torch.rand(R, generator=g, dtype=dtype) + 0.5
    return w, table, x, idx, scale


CASES = [(5, 3, 7, 37), (4, 1, 3, 130), (6, 8, 2, 16), (3, 5, 40, 9)]  # D > 128: several column blocks


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


# -- the three row operations -------------------------------------------------------------
@pytest.mark.parametrize("kernels", ["triton_ops", "cpu_ops"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_row_kernels_match_torch(kernels, case, dtype, request):
    kernels = request.getfixturevalue(kernels)
    w, table, x, idx, scale = rows_case(*case, dtype)
    R = table.shape[0]
    pairs = [
        (kernels.weighted_gather(w, table, idx), torch_ops.weighted_gather(w, table, idx)),
        (kernels.weighted_gather(None, table, idx), torch_ops.weighted_gather(None, table, idx)),
        (kernels.row_dot(x, table, idx), torch_ops.row_dot(x, table, idx)),
        (kernels.scatter_rows(w, x, idx, R), torch_ops.scatter_rows(w, x, idx, R)),
        (kernels.scatter_rows(None, x, idx, R + 2), torch_ops.scatter_rows(None, x, idx, R + 2)),
        (kernels.scatter_rows(w, x, idx, R, scale), torch_ops.scatter_rows(w, x, idx, R, scale)),
    ]
    for got, want in pairs:
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_kernels_against_definitions(dtype):
    """The PyTorch paths themselves, against the formulas written out."""
    w, table, x, idx, scale = rows_case(5, 3, 7, 6, dtype)
    rows = table[idx]  # [M, P, D]
    torch.testing.assert_close(torch_ops.weighted_gather(w, table, idx), (w.unsqueeze(-1) * rows).sum(1))
    torch.testing.assert_close(torch_ops.row_dot(x, table, idx), (rows * x.unsqueeze(1)).sum(-1))
    want = torch.zeros(7, 6, dtype=dtype)
    for m, p in itertools.product(range(5), range(3)):
        want[idx[m, p]] += w[m, p] * x[m]
    torch.testing.assert_close(torch_ops.scatter_rows(w, x, idx, 7, scale), want * scale.unsqueeze(-1))


@pytest.mark.skipif(not AVX512, reason="the rounding of the PyTorch path was matched on an AVX-512 CPU")
@pytest.mark.parametrize("D", [32, 64, 512])
def test_cpu_row_kernels_are_bitwise_the_torch_path_at_the_memorys_shapes(cpu_ops, D):
    """float32 rows of a multiple of 8: the same bits as the PyTorch path (a fixed-seed training run
    must not move), for distinct reads per reader (the memory's) and for repeated ones."""
    g = torch.Generator().manual_seed(D)
    M, P, R = 300, 8, 1000
    idx = torch.stack([torch.randperm(R, generator=g)[:P] for _ in range(M)])
    repeated = idx.clone()
    repeated[::7, -1] = repeated[::7, 0]
    w, x = torch.randn(M, P, generator=g), torch.randn(M, D, generator=g)
    table, scale = torch.randn(R, D, generator=g), torch.rand(R, generator=g) + 0.5
    for ids in (idx, repeated):
        assert torch.equal(cpu_ops.weighted_gather(w, table, ids), torch_ops.weighted_gather(w, table, ids))
        assert torch.equal(cpu_ops.row_dot(x, table, ids), torch_ops.row_dot(x, table, ids))
        assert torch.equal(cpu_ops.scatter_rows(w, x, ids, R, scale), torch_ops.scatter_rows(w, x, ids, R, scale))
        assert torch.equal(cpu_ops.scatter_rows(None, x, ids, R), torch_ops.scatter_rows(None, x, ids, R))


def test_cpu_gather_rounds_as_the_pytorch_path_does_on_this_cpu(cpu_ops, monkeypatch):
    """MKL's sparse product fuses its multiply-adds on some CPUs and not on others (Intel / AMD AVX-512):
    the C++ gather asks once and rounds the same way; the other rounding would be other bits."""
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(500, generator=g)[:8] for _ in range(200)])
    w, table = torch.randn(200, 8, generator=g), torch.randn(500, 64, generator=g)
    want = torch_ops.weighted_gather(w, table, idx)
    assert torch.equal(cpu_ops.weighted_gather(w, table, idx), want)
    monkeypatch.setattr(cpu_ops, "_fuses", not cpu_ops.sparse_product_fuses())
    other = cpu_ops.weighted_gather(w, table, idx)
    assert not torch.equal(other, want) and torch.allclose(other, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_topk_rows_is_torch_topk_ties_and_nans_included(cpu_ops, dtype):
    """Values and ids of torch.topk (largest, sorted) for rows of distinct values, rows whose top k
    a tie decides (few distinct values), -inf, and NaNs (which torch ranks first)."""
    g = torch.Generator().manual_seed(1)
    distinct = torch.randn(64, 512, generator=g, dtype=dtype)
    tied = torch.randint(0, 6, (64, 40), generator=g).to(dtype)
    special = torch.randn(6, 20, generator=g, dtype=dtype)
    special[0, 3] = special[1, :5] = float("nan")
    special[2, :] = float("-inf")
    special[3, 7] = float("inf")
    for x, k in ((distinct, 8), (distinct, 1), (tied, 8), (tied, 40), (special, 4), (distinct[:0], 3)):
        vals, ids = cpu_ops.topk_rows(x, k)
        want = x.topk(k, dim=-1)
        assert torch.equal(ids, want.indices)
        torch.testing.assert_close(vals, want.values, rtol=0, atol=0, equal_nan=True)
    vals, ids = cpu_ops.topk_rows(distinct.view(4, 16, 512), 8)  # leading dims kept
    assert ids.shape == (4, 16, 8) and torch.equal(ids, distinct.view(4, 16, 512).topk(8, -1).indices)


def test_cpu_kernels_give_clear_errors_on_bad_input(cpu_ops):
    ext = cpu_ops._extension()
    with pytest.raises(RuntimeError, match="k=9"):
        ext.topk_rows(torch.zeros(2, 8), 9)
    with pytest.raises(RuntimeError, match="int64"):
        ext.weighted_gather(None, torch.zeros(4, 3), torch.zeros(2, 2, dtype=torch.int32), True)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ext.row_dot(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(4, 3, dtype=torch.int64),
                    torch.zeros(2, 2, dtype=torch.int64))


def _row_functions(backend, idx, R, scale):
    return {
        "weighted_gather": (lambda w, t, x: ops.weighted_gather(w, t, idx, backend), ("w", "table")),
        "row_dot": (lambda w, t, x: ops.row_dot(x, t, idx, backend), ("x", "table")),
        "scatter_rows": (lambda w, t, x: ops.scatter_rows(w, x, idx, R, scale, backend), ("w", "x")),
    }


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("op", ["weighted_gather", "row_dot", "scatter_rows"])
def test_row_ops_gradcheck_to_second_order(op, backend, request):
    if backend != "torch":
        request.getfixturevalue(f"{backend}_ops")
    w, table, x, idx, scale = rows_case(3, 2, 4, 3, torch.float64, seed=3)
    fn, wrt = _row_functions(backend, idx, 4, scale)[op]
    args = {"w": w, "table": table, "x": x}
    leaves = [args[n].clone().requires_grad_(True) for n in wrt]

    def f(*ts):
        kw = dict(args) | dict(zip(wrt, ts))
        return fn(kw["w"], kw["table"], kw["x"])

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(f, leaves, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("weighted", [True, False])
def test_scatter_rows_at_is_rows_of_scatter_rows_to_second_order(backend, weighted, request):
    """scatter_rows_at(w, x, idx, scale, sel, value) == scatter_rows(w, x, idx, R, scale)[sel], with
    the same first and second derivatives w.r.t. w and x (its backward skips the [R, D] gradient)."""
    if backend != "torch":
        request.getfixturevalue(f"{backend}_ops")
    w, _, x, idx, scale = rows_case(5, 3, 9, 4, torch.float64, seed=7)
    sel = torch.tensor([6, 0, idx[2, 1].item()])  # some rows read, maybe one nobody read
    w = w if weighted else None

    def full(w, x):
        return ops.scatter_rows(w, x, idx, 9, scale, backend)[sel]

    def at(w, x):
        value = ops.scatter_rows(w, x, idx, 9, scale, backend).detach()
        return ops.scatter_rows_at(w, x, idx, scale, sel, value, backend)

    leaves = [t.clone().requires_grad_(True) for t in (w, x) if t is not None]

    def of_leaves(fn):  # fn(w, x) as a function of the leaves (x alone when unweighted)
        return (lambda w, x: fn(w, x)) if weighted else (lambda x: fn(None, x))

    torch.testing.assert_close(of_leaves(at)(*leaves), full(w, x), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(of_leaves(at), leaves, eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(of_leaves(at), leaves, eps=1e-6, atol=1e-8)
    probe = torch.randn(len(sel), 4, dtype=torch.float64)
    grads = {}
    for fn in (full, at):
        args = [t.clone().requires_grad_(True) for t in leaves]
        grads[fn] = torch.autograd.grad((of_leaves(fn)(*args) * probe).sum(), args)
    for got, want in zip(grads[at], grads[full]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["weighted_gather", "row_dot", "scatter_rows"])
def test_row_ops_gradients_triton_equal_torch(triton_ops, op):
    """First and second derivatives (create_graph) of each op: Triton path == PyTorch path."""
    w, table, x, idx, scale = rows_case(6, 4, 9, 20, torch.float32, seed=5)
    results = []
    for backend in ("torch", "triton"):
        fn, wrt = _row_functions(backend, idx, 9, scale)[op]
        leaves = {n: t.clone().requires_grad_(True) for n, t in (("w", w), ("table", table), ("x", x))}
        out = fn(leaves["w"], leaves["table"], leaves["x"])
        probe = torch.linspace(-1, 1, out.numel()).view_as(out)
        grads = torch.autograd.grad((out * probe).sum(), [leaves[n] for n in wrt], create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in grads), [leaves[n] for n in wrt])
        results.append((out, *grads, *second))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# -- product-key addressing --------------------------------------------------------------
@pytest.mark.parametrize("score", ["dot", "idw"])
def test_torch_select_subkeys_in_token_tiles_matches_the_dense_top_k(monkeypatch, score):
    """The PyTorch selection scores tokens in tiles; tile edges (1, 3 and 7 tokens per tile,
    none dividing B*T = 10) must not change which sub-keys are chosen."""
    B, T, H, dk, n, k = 2, 5, 2, 8, 11, 3
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(B, T, H, dk, generator=g), torch.randn(H, 2, n, dk // 2, generator=g)
    want = torch.stack([torch_ops.sub_scores(q[..., h * 4:(h + 1) * 4], keys[:, h], score).topk(k, -1).indices
                        for h in range(2)], dim=-2)
    for tile_tokens in (1, 3, 7):
        monkeypatch.setattr(torch_ops, "SELECT_TILE_ELEMENTS", tile_tokens * n * H * 2)
        assert torch.equal(torch_ops.select_subkeys(q, keys, k, score), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("score", ["dot", "idw"])
@pytest.mark.parametrize("shape", [(2, 5, 2, 10, 70, 5), (1, 3, 1, 40, 9, 3)])  # B, T, H, dk, n, k
def test_select_subkeys_kernel_matches_torch(triton_ops, shape, score, dtype):
    B, T, H, dk, n, k = shape
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, T, H, dk, generator=g, dtype=dtype)
    keys = torch.randn(H, 2, n, dk // 2, generator=g, dtype=dtype)
    got = triton_ops.select_subkeys(q, keys, k, score)
    want = torch_ops.select_subkeys(q, keys, k, score)
    assert torch.equal(got, want)
    # and the selection is the top-k of the dense sub-scores, best first
    for half in range(2):
        qh = q[..., half * (dk // 2):(half + 1) * (dk // 2)]
        top = torch_ops.sub_scores(qh, keys[:, half], score).topk(k, -1).indices
        assert torch.equal(got[..., half, :], top)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("score", ["dot", "idw"])
@pytest.mark.parametrize("shape", [(2, 5, 2, 10, 70, 5), (1, 3, 1, 40, 9, 3), (4, 64, 1, 64, 512, 8)])
def test_cpu_select_subkeys_is_the_torch_selection(cpu_ops, shape, score, dtype):
    B, T, H, dk, n, k = shape
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, T, H, dk, generator=g, dtype=dtype)
    keys = torch.randn(H, 2, n, dk // 2, generator=g, dtype=dtype)
    assert torch.equal(cpu_ops.select_subkeys(q, keys, k, score), torch_ops.select_subkeys(q, keys, k, score))


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("score", ["dot", "idw"])
def test_address_equals_dense_addressing(score, backend, request):
    """ops.address (sparse gradients) == torch_ops.address (dense sub-score matrices), to 2nd order."""
    if backend != "torch":
        request.getfixturevalue(f"{backend}_ops")
    g = torch.Generator().manual_seed(11)
    B, T, H, dk, n, k = 2, 4, 2, 8, 9, 3
    q0 = torch.randn(B, T, H, dk, generator=g, dtype=torch.float64)
    k0 = torch.randn(H, 2, n, dk // 2, generator=g, dtype=torch.float64)
    outs = []
    for fn in (torch_ops.address, lambda *a: ops.address(*a, backend=backend)):
        q, keys = q0.clone().requires_grad_(True), k0.clone().requires_grad_(True)
        ((t1, i1), (t2, i2)), scores, slots = fn(q, keys, k, score)
        loss = (scores.sin() * 3).sum() + (t1.cos() * t2).sum()
        gq, gk = torch.autograd.grad(loss, (q, keys), create_graph=True)
        second = torch.autograd.grad((gq**2).sum() + (gk**3).sum(), (q, keys))
        outs.append((i1, i2, slots, t1, t2, scores, gq, gk, *second))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)


def test_scatter_rows_small_and_csr_paths_agree(monkeypatch):
    """torch_ops.scatter_rows materialises the reads below DENSE_SCATTER_ELEMENTS (one index_add),
    else multiplies by a CSR matrix: the same function either way."""
    for case in CASES:
        w, table, x, idx, scale = rows_case(*case, torch.float64)
        R = table.shape[0]
        calls = [(w, x, idx, R, scale), (None, x, idx, R + 2, None), (w, x, idx, R, None)]
        small = [torch_ops.scatter_rows(*c) for c in calls]
        with monkeypatch.context() as m:
            m.setattr(torch_ops, "DENSE_SCATTER_ELEMENTS", 0)
            csr = [torch_ops.scatter_rows(*c) for c in calls]
        for a, b in zip(small, csr):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("score", ["dot", "idw"])
def test_sub_scores_are_the_spec_scores(score):
    """The dense scoring (used by fwpkm.naive) against spec 1.1 written out: <q, key> for dot,
    -log(1e-3 + |q - key|^2) for idw (computed there as |q|^2 - 2 <q, key> + |key|^2)."""
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 3, 2, 4, generator=g, dtype=torch.float64)  # [B, T, H, d]
    keys = torch.randn(2, 7, 4, generator=g, dtype=torch.float64)  # [H, n, d]
    diff = q.unsqueeze(-2) - keys  # [B, T, H, n, d]
    want = (q.unsqueeze(-2) * keys).sum(-1) if score == "dot" else -torch.log(1e-3 + diff.pow(2).sum(-1))
    torch.testing.assert_close(torch_ops.sub_scores(q, keys, score), want, rtol=1e-12, atol=1e-12)


# -- the memory with the Triton kernels, against the dense reference -----------------------
TRITON_CONFIGS = [
    dict(),
    dict(score="dot", grad_to_values_only=False, lookahead=0),
    dict(weight_decay=0.1, lr=0.5, grad_clip=True, mse="mean"),
    dict(heads=1, topk=6, score_fn="silu", addr_loss_weight=None),
]


@pytest.mark.parametrize("overrides", TRITON_CONFIGS)
def test_memory_triton_backend_matches_reference(make_memory, memory_inputs, compare_with_reference, count_kernels,
                                                 overrides):
    mem = make_memory(backend="triton", **overrides)
    compare_with_reference(mem, *memory_inputs(mem, gated=True, masked=True))
    assert set(count_kernels) == {"weighted_gather", "row_dot", "scatter_rows", "select_subkeys"}


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("overrides", TRITON_CONFIGS)
def test_memory_cpu_backends_match_reference(make_memory, memory_inputs, compare_with_reference, backend, overrides,
                                             request):
    if backend == "cpu":
        request.getfixturevalue("cpu_ops")
    mem = make_memory(backend=backend, **overrides)
    compare_with_reference(mem, *memory_inputs(mem, gated=True, masked=True))


@pytest.mark.skipif(not AVX512, reason="the rounding of the PyTorch path was matched on an AVX-512 CPU")
def test_memory_training_step_is_bitwise_the_same_with_cpu_kernels(cpu_ops):
    """The recall grid's memory shape (dk = dv = 64, 512^2 slots, top-8, chunks of 64), float32: the
    reads, the gradients to q and v, and the stored fast weights after two training calls are the
    same bits with the C++ kernels as with the PyTorch path (a fixed-seed run does not move)."""
    from fwpkm.config import MemoryConfig
    from fwpkm.memory import FwPKMMemory

    results = []
    for backend in ("torch", "cpu"):
        torch.manual_seed(0)
        mem = FwPKMMemory(MemoryConfig(k_dim=64, v_dim=64, chunk_size=64, n_subkeys=512, topk=8,
                                       backend=backend)).train()
        g = torch.Generator().manual_seed(1)
        got = []
        for _ in range(2):
            q = F.normalize(torch.randn(2, 160, 2, 32, generator=g), dim=-1).flatten(-2).requires_grad_()
            v = torch.randn(2, 160, 64, generator=g).requires_grad_()
            out = mem(q, v).output
            (out * torch.randn(out.shape, generator=g)).sum().backward()
            got += [out.detach(), q.grad, v.grad]
        results.append(got + [mem.keys.clone(), mem.values.clone()])
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)


def test_memory_process_wide_triton_backend(make_memory, memory_inputs, compare_with_reference, count_kernels):
    ops.set_backend("triton")  # the memory's config says "auto": the process setting decides
    mem = make_memory()
    compare_with_reference(mem, *memory_inputs(mem, T=11), chunk=4)
    assert count_kernels.get("weighted_gather", 0) > 0 and count_kernels.get("select_subkeys", 0) > 0


def test_memory_streaming_with_triton_equals_torch(make_memory, memory_inputs, triton_ops):
    outs = []
    for backend in ("torch", "triton"):
        mem = make_memory(backend=backend).eval()
        q, v, g, m = memory_inputs(mem, T=12, gated=True, masked=True)
        stream = mem.new_stream()
        pieces = [mem(q[:, a:b], v[:, a:b], g[:, a:b], m[:, a:b], stream=stream).output for a, b in
                  ((0, 3), (3, 9), (9, 12))]
        mem.flush(stream)
        outs.append((torch.cat(pieces, 1), mem.keys.clone(), mem.values.clone()))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# -- backend choice ------------------------------------------------------------------------
def test_backend_resolution(monkeypatch):
    cpu = torch.zeros(1)
    auto_on_cpu = "cpu" if ops.cpu_kernels_available() else "torch"  # auto: Triton only for CUDA tensors
    assert ops.resolve("auto", cpu) == auto_on_cpu
    assert ops.resolve(None, cpu) == auto_on_cpu
    assert ops.resolve("torch", cpu) == "torch"
    monkeypatch.setenv("FWPKM_CPU_KERNELS", "0")
    assert ops.resolve("auto", cpu) == "torch"  # the opt-out
    monkeypatch.delenv("FWPKM_CPU_KERNELS")
    with pytest.raises(ValueError, match="backend"):
        ops.set_backend("cuda")
    with pytest.raises(ValueError, match="backend"):
        ops.resolve("fast", cpu)
    with ops.use_backend("torch"):
        assert ops.get_backend() == "torch"
    assert ops.get_backend() == "auto"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET|triton"):
        ops.resolve("triton", cpu)  # no GPU, no interpreter: a clear error, never a silent fallback
    ops.set_backend("triton")
    assert ops.resolve("torch", cpu) == "torch"  # an explicit per-call choice wins


def test_triton_backend_in_config(make_memory, memory_inputs, triton_ops):
    mem = make_memory(backend="triton")
    assert mem.config.backend == "triton"
    out = mem.eval()(*memory_inputs(mem)[:2]).output
    assert torch.isfinite(out).all()


# -- the sparse core keeps nothing of size N ---------------------------------------------
def test_training_graph_saves_no_table_sized_tensor(make_memory, memory_inputs):
    """Only read rows are kept for backward: no saved tensor has N rows (or N * dv elements)."""
    mem = make_memory(n_subkeys=40, v_dim=4, heads=1, topk=2, chunk_size=4)  # N = 1600 slots
    q, v, g, _ = memory_inputs(mem, B=1, T=12, gated=True)
    N = mem.config.n_slots
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mem.train()(q, v, g).output
    out.sum().backward()
    assert shapes, "no tensor was saved: the hook did not run"
    too_big = [s for s in shapes if (len(s) and s[0] >= N) or torch.Size(s).numel() >= N]
    assert not too_big, too_big


@pytest.mark.parametrize("weight_decay,values_only", [(0.0, True), (0.5, True), (0.0, False)])
def test_no_graph_path_writes_in_place_same_result(make_memory, memory_inputs, weight_decay, values_only):
    """Without a graph each chunk is written into the table at once (weight decay as a lazy
    factor, folded in now and then) and reads keep no graph past their write: same reads and
    state as the graph path."""
    # with weight_decay 0.5 the lazy decay factor gets folded in
    mem = make_memory(weight_decay=weight_decay, lr=1.0, chunk_size=2, grad_to_values_only=values_only)
    q, v, g, m = memory_inputs(mem, T=31, gated=True, masked=True)
    saved = {k: t.clone() for k, t in mem.state_dict().items()}
    train_out = mem.train()(q, v, g, m).output.detach()
    train_state = {k: t.clone() for k, t in mem.state_dict().items()}
    mem.load_state_dict(saved)
    eval_out = mem.eval()(q, v, g, m).output
    torch.testing.assert_close(eval_out, train_out, rtol=1e-10, atol=1e-12)
    for k in saved:
        torch.testing.assert_close(mem.state_dict()[k], train_state[k], rtol=1e-10, atol=1e-12)


# -- the kernels also build for a GPU -------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_kernels_compile_for_cuda_ahead_of_time(triton_ops, dtype, monkeypatch):
    """The interpreter runs the kernels' Python; this lowers each one with Triton's real compiler
    to a CUDA binary (sm_90, no GPU needed), catching what only the compiler checks."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    f, i64, i32, c = f"*{dtype}", "*i64", "i32", "constexpr"
    use_dot = dtype == "fp32"
    kernels = {
        "_weighted_gather_kernel": (dict(w_ptr=f, table_ptr=f, idx_ptr=i64, out_ptr=f, P=i32, D=i32),
                                    dict(HAS_W=True, BLOCK_P=8, BLOCK_D=128)),
        "_row_dot_kernel": (dict(x_ptr=f, table_ptr=f, idx_ptr=i64, out_ptr=f, P=i32, D=i32),
                            dict(BLOCK_P=8, BLOCK_D=128)),
        "_scatter_rows_kernel": (dict(w_ptr=f, x_ptr=f, order_ptr=i64, offsets_ptr=i64, scale_ptr=f, out_ptr=f,
                                      P=i32, D=i32), dict(HAS_W=True, HAS_SCALE=True, BLOCK_R=16, BLOCK_D=128)),
        "_select_subkeys_kernel": (dict(q_ptr=f, k_ptr=f, out_ptr=i64, M=i32, N=i32, D=i32, HD2=i32),
                                   dict(K=8, KP=8, IDW=True, USE_DOT=use_dot, BLOCK_M=32 if use_dot else 16,
                                        BLOCK_N=64 if use_dot else 16, BLOCK_D=64 if use_dot else 16)),
    }
    for name, (signature, constexprs) in kernels.items():
        src = ASTSource(fn=triton.jit(getattr(triton_ops, name)), signature=signature | dict.fromkeys(constexprs, c),
                        constexprs=constexprs)
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        except (FileNotFoundError, ImportError) as exc:  # pragma: no cover - no CUDA toolchain in this wheel
            pytest.skip(f"no CUDA compiler toolchain: {exc!r}")
        assert "cubin" in compiled.asm, name


# -- the benchmark script runs (tiny sizes) -------------------------------------------------
def test_benchmark_script_smoke(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
    tiny = ["--n-subkeys", "8", "--dim", "16", "--chunk", "16", "--topk", "2", "--out", str(tmp_path)]
    # (its train mode runs in tests/test_benchmarks.py, as the GPU check's layer step)
    for mode, extra in (("parts", ["--batch", "1", "--seq", "40", "--steps", "2", "--warmup", "0"]),
                        ("stream", ["--tokens", "100", "--piece", "30"])):
        proc = subprocess.run([sys.executable, str(script), mode, *tiny, *extra], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (tmp_path / f"{mode}.csv").exists()
        payload = json.loads((tmp_path / f"{mode}.json").read_text())
    parts = json.loads((tmp_path / "parts.json").read_text())["table"][0]
    assert parts["selection_ms"] > 0 and parts["commit_ms"] > 0 and parts["backward_ms"] > 0
    assert parts["step_ms"] == pytest.approx(parts["selection_ms"] + parts["commit_ms"] + parts["forward_rest_ms"]
                                             + parts["backward_ms"])
    assert payload["result"]["tokens"] == 100 and payload["result"]["peak_over_state_plus_chunk"] > 0


def test_without_a_compiler_auto_keeps_the_pytorch_path_and_cpu_says_why(tmp_path):
    """Where the C++ extension cannot be built, "auto" runs the PyTorch path and an explicit
    backend="cpu" fails with the reason (a fresh extensions folder, a compiler that fails)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch\nfrom kernels import ops\nfrom fwpkm.config import MemoryConfig\n"
            "from fwpkm.memory import FwPKMMemory\n"
            "assert ops.resolve('auto', torch.zeros(1)) == 'torch'\n"
            "m = FwPKMMemory(MemoryConfig(k_dim=8, v_dim=8, n_subkeys=8, chunk_size=4)).train()\n"
            "assert m(torch.randn(1, 8, 8), torch.randn(1, 8, 8)).output.shape == (1, 8, 8)\n"
            "try:\n    ops.resolve('cpu', torch.zeros(1))\nexcept RuntimeError as e:\n    print(e)\n")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CXX="false",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "backend='cpu': the C++ extension could not be built" in proc.stdout
