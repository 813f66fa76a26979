#!/usr/bin/env python
"""The parts of ``benchmarks/gpu_check.sh`` that no other benchmark does.

Modes
-----
env        The machine: device name, torch / triton / fla versions, CUDA availability.
kernels    Each Triton kernel against its PyTorch path on the device, at the layer
           benchmark's sizes: forward and first-order gradients (weighted_gather, row_dot,
           scatter_rows, select_subkeys), then one FwPKM layer's training step (forward with
           meta-gradients and backward into q, v, gates) with backend triton against torch.
bandwidth  The device's copy bandwidth (a 1 GiB tensor copied, best of 10), and for each row of
           a layer benchmark (``bench_memory.py train --device cuda`` output, --layer) the
           bandwidth it achieved: the modelled bytes of a step over its median time (the formula
           is ``layer_bytes``), as a fraction of the copy bandwidth.
gdn        fla's chunked Gated DeltaNet kernel against the PyTorch chunked path: largest
           difference of outputs and final states, and the time of each.

Each mode writes ``<mode>.json`` under --out. On a CPU, ``kernels`` runs Triton's interpreter
(TRITON_INTERPRET=1) at --quick sizes: the check's own test (tests/test_benchmarks.py).

Examples
--------
    python benchmarks/gpu_check.py kernels --device cuda --out benchmarks/results/gpu
    python benchmarks/gpu_check.py bandwidth --layer benchmarks/results/gpu/train.json --out benchmarks/results/gpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 2.0**30


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeat: int = 5) -> float:
    """Best wall-clock seconds of ``fn()`` over ``repeat`` calls (after one warm-up call)."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def mode_env(ns) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"device": props.name, "memory_gib": props.total_memory / GiB, "capability": [props.major, props.minor],
                 "cuda": torch.version.cuda}
    for name in ("triton", "fla"):
        try:
            info[name] = getattr(__import__(name), "__version__", "installed")
        except Exception as exc:  # optional packages: record why they are missing
            info[name] = f"missing ({type(exc).__name__})"
    return info


def _compare(got, want, rtol: float, atol: float) -> dict:
    import torch

    diff = (got.double() - want.double()).abs()
    scale = want.double().abs().max().item() or 1.0
    ok = bool(torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol * scale))
    return {"max_abs_diff": diff.max().item(), "max_abs_ref": scale, "ok": ok}


def mode_kernels(ns) -> dict:
    import torch

    from kernels import ops

    dev, g = torch.device(ns.device), torch.Generator().manual_seed(0)
    M, P, R, D = (64, 4, 50, 24) if ns.quick else (16384, 8, 262144, 512)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dev)
    idx = torch.randint(0, R, (M, P), generator=g).to(dev)
    w, table, x, scale = rand(M, P), rand(R, D), rand(M, D), (torch.rand(R, generator=g) + 0.5).to(dev)
    cases = {
        "weighted_gather": (lambda b, w_, t_, x_: ops.weighted_gather(w_, t_, idx, b), ("w", "table")),
        "row_dot": (lambda b, w_, t_, x_: ops.row_dot(x_, t_, idx, b), ("x", "table")),
        "scatter_rows": (lambda b, w_, t_, x_: ops.scatter_rows(w_, x_, idx, R, scale, b), ("w", "x")),
    }
    results = {}
    for name, (fn, wrt) in cases.items():
        outs = {}
        for backend in ("torch", "triton"):
            leaves = {"w": w.clone().requires_grad_(), "table": table.clone().requires_grad_(),
                      "x": x.clone().requires_grad_()}
            out = fn(backend, leaves["w"], leaves["table"], leaves["x"])
            probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dev)
            grads = torch.autograd.grad((out * probe).sum(), [leaves[k] for k in wrt])
            outs[backend] = (out.detach(), grads)
            outs[backend + "_s"] = _timed(lambda: fn(backend, w, table, x), dev, repeat=3)
        results[name] = {"forward": _compare(outs["triton"][0], outs["torch"][0], 1e-4, 1e-5),
                         **{f"grad_{k}": _compare(a, b, 1e-4, 1e-5)
                            for k, a, b in zip(wrt, outs["triton"][1], outs["torch"][1])},
                         "torch_ms": 1e3 * outs["torch_s"], "triton_ms": 1e3 * outs["triton_s"]}
    H, n, dk = 1, (16 if ns.quick else 512), (16 if ns.quick else 512)
    q, keys = rand(2, M // 2, H, dk), rand(H, 2, n, dk // 2)
    ids = {b: ops.select_subkeys(q, keys, 8, "idw", b) for b in ("torch", "triton")}
    results["select_subkeys"] = {"same_ids": float((ids["torch"] == ids["triton"]).double().mean()),
                                 "ok": bool((ids["torch"] == ids["triton"]).double().mean() > 0.999)}
    results["layer_train_step"] = _layer_step(ns, dev)
    results["ok"] = all(v["ok"] if "ok" in v else all(p["ok"] for p in v.values() if isinstance(p, dict))
                        for v in results.values())
    return results


def _layer_step(ns, dev) -> dict:
    """One FwPKM layer's training step with the Triton backend against the PyTorch one."""
    import torch

    from fwpkm import FwPKMMemory, MemoryConfig

    n, d, B, T, chunk = (8, 16, 1, 40, 16) if ns.quick else (512, 512, 2, 2048, 512)
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        mem = FwPKMMemory(MemoryConfig(n_subkeys=n, k_dim=d, v_dim=d, chunk_size=chunk, backend=backend)).to(dev)
        mem.train()
        g = torch.Generator().manual_seed(1)
        q, v = (torch.randn(B, T, d, generator=g).to(dev).requires_grad_() for _ in range(2))
        gates = torch.rand(B, T, generator=g).to(dev).requires_grad_()
        out = mem(q, v, gates).output
        out.square().mean().backward()
        results[backend] = (out.detach(), q.grad, v.grad, gates.grad, mem.values.detach().clone())
    names = ("reads", "grad_q", "grad_v", "grad_gates", "values_after")
    return {name: _compare(a, b, 1e-3, 1e-4) for name, a, b in zip(names, results["triton"], results["torch"])}


def layer_bytes(n_subkeys: int, batch: int, seq: int, chunk: int, dim: int, heads: int, topk: int,
                impl: str, elt: int = 4) -> float:
    """Modelled bytes one training step of ``bench_memory.py train`` moves (forward and backward).

    Per chunk of C = batch*chunk tokens: the sub-key scoring reads the keys and q (2 n d/2 + C d)
    and writes the ranking [C, H, 2, n] once; the read gathers C*H*k rows of the table (and
    writes them as theta_c), the write scatters one update of as many rows and the commit
    reads and writes them. The backward is counted as twice the forward. The dense
    implementation adds, per chunk, the whole [N, dv] table read and written (the new copy) and
    its dense gradient written and read."""
    C, rows = batch * chunk, batch * chunk * heads * topk
    scoring = heads * (2 * n_subkeys * dim // 2) + C * heads * dim + C * heads * 2 * n_subkeys
    per_chunk = scoring + 2 * rows * dim + rows * dim + 2 * rows * dim
    if impl == "dense":
        per_chunk += 4 * n_subkeys**2 * dim
    return 3.0 * per_chunk * elt * (seq // chunk)


def mode_bandwidth(ns) -> dict:
    import torch

    dev = torch.device(ns.device)
    size = int((64 * 2**20) if ns.quick else GiB)
    src = torch.empty(size // 4, dtype=torch.float32, device=dev).normal_()
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), dev, repeat=10)
    copy_gb_s = 2 * size / seconds / 1e9  # read + write
    result = {"copy_bytes": size, "copy_gb_s": copy_gb_s, "layer": []}
    if ns.layer and Path(ns.layer).exists():
        payload = json.loads(Path(ns.layer).read_text())
        args = payload["args"]
        for row in payload["rows"]:
            for impl in ("ours", "dense"):
                r = row.get(impl, {})
                if "tok_s" not in r:
                    continue
                step_s = args["batch"] * args["seq"] / r["tok_s"]
                moved = layer_bytes(row["n_subkeys"], args["batch"], args["seq"], args["chunk"], args["dim"],
                                    args["heads"], args["topk"], impl)
                result["layer"].append({"N": f"{row['n_subkeys']}^2", "impl": impl, "tok_s": r["tok_s"],
                                        "modelled_gb_per_step": moved / 1e9, "achieved_gb_s": moved / step_s / 1e9,
                                        "fraction_of_copy": moved / step_s / 1e9 / copy_gb_s})
    return result


def mode_gdn(ns) -> dict:
    import torch
    import torch.nn.functional as F

    from fwpkm.layers import fla_chunk_gated_delta_rule, gated_delta_rule_chunked

    dev, g = torch.device(ns.device), torch.Generator().manual_seed(0)
    B, T, H, K = (1, 64, 2, 16) if ns.quick else (4, 4096, 12, 64)
    q = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1).to(dev)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1).to(dev)
    v = torch.randn(B, T, H, K, generator=g).to(dev)
    gate = -F.softplus(torch.randn(B, T, H, generator=g)).to(dev)
    beta = torch.rand(B, T, H, generator=g).to(dev)
    torch_path = lambda: gated_delta_rule_chunked(q, k, v, gate, beta)
    o_ref, s_ref = torch_path()
    result = {"shape": [B, T, H, K], "torch_ms": 1e3 * _timed(torch_path, dev, repeat=3)}
    if fla_chunk_gated_delta_rule is None or dev.type != "cuda":
        return result | {"fla": "not run: needs fla and CUDA", "ok": dev.type != "cuda"}
    fla_path = lambda: fla_chunk_gated_delta_rule(q, k, v, gate, beta, output_final_state=True)
    o, s = fla_path()
    return result | {"fla_ms": 1e3 * _timed(fla_path, dev, repeat=3), "output": _compare(o, o_ref, 2e-3, 2e-3),
                     "state": _compare(s, s_ref, 2e-3, 2e-3),
                     "ok": bool(torch.allclose(o, o_ref, atol=2e-3, rtol=2e-3))}


MODES = {"env": mode_env, "kernels": mode_kernels, "bandwidth": mode_bandwidth, "gdn": mode_gdn}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Modes"):])
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (kernels: with TRITON_INTERPRET=1)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the check's own test on a CPU)")
    p.add_argument("--layer", default=None, help="bandwidth: the bench_memory.py train JSON to rate")
    p.add_argument("--out", type=Path, default=None, help="directory for <mode>.json")
    ns = p.parse_args(argv)
    if ns.mode == "kernels" and ns.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    result = MODES[ns.mode](ns)
    print(json.dumps(result, indent=2, default=str))
    if ns.out:
        ns.out.mkdir(parents=True, exist_ok=True)
        (ns.out / f"{ns.mode}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
