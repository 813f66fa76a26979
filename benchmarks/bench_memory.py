#!/usr/bin/env python
"""Time one FwPKM memory layer: the project's sparse core against a dense implementation.

Modes
-----
train   One training step (forward with meta-gradients + backward of a loss on the reads
        into q, v and the gates) of one FwPKM memory layer, for each number of slots N,
        for this project's layer ("ours") and a dense implementation of the same algorithm
        ("dense": fwpkm/naive.py, the paper's way). Reports tokens/s and peak memory side
        by side.
parts   Our training step split into the parts whose cost grows with N: sub-key selection,
        commit (the row updates added to the stored table), the rest of the forward, and
        the backward; wall-clock ms per step for each N (timers wrapped around the
        memory's functions, one fresh process per N).
stream  The no-graph streaming path (evaluation): feeds a long input (default 128K tokens)
        through one layer via ``memory.new_stream()`` in pieces and reports tokens/s and
        peak memory against (state size + one chunk's activations).

Every measurement runs in a fresh subprocess, so each peak is clean, and each configuration
runs twice: once for time and once for memory.

Time: wall-clock seconds per step after --warmup untimed steps; tokens/s = B*T / step time,
reported for the median step and for the best step. With --rounds R our layer is timed R
times per N, interleaved across N, and the median/best are over all its timed steps (the
dense baseline, slow, runs once). Other processes on a shared machine only ever add time,
so the best step is the closer estimate of the cost itself; the median shows the spread.
The process CPU seconds per step are recorded as well. Workers run with
OMP_WAIT_POLICY=PASSIVE by default (--omp-wait-policy): with spinning OpenMP threads a
2-core machine shared with other jobs slows every parallel op down by a scheduler slice.

Memory: the resident set (RSS) read from /proc/self/status: ``VmHWM``, the kernel's
high-water mark of RSS, reset through /proc/self/clear_refs once the state and the inputs
exist, minus the RSS right after importing torch and the library, before any state was
allocated. So "peak" = state + inputs + everything the training steps allocate, without
the Python/PyTorch runtime that both implementations share. The memory run sets glibc's
MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=128 KiB so that freed tensors go back to the
OS at once and RSS follows the live tensors rather than the allocator's cache (glibc's
default raises its mmap threshold as large blocks are freed and then keeps up to ~32 MiB
blocks on its heap). The timing run keeps glibc's default settings, or with --malloc tuned
those that `fwpkm train` uses (lit/runtime.py); its RSS peak is reported too
("rss_default_malloc").

Examples
--------
    python benchmarks/bench_memory.py train --out benchmarks/results
    python benchmarks/bench_memory.py train --n-subkeys 128 512 --steps 3 --dense-max-n 512
    python benchmarks/bench_memory.py parts --malloc tuned
    python benchmarks/bench_memory.py stream --tokens 131072 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 2.0**20
PRECISE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
OMP_WAIT_POLICY = None  # set from --omp-wait-policy
THP = False  # set from --thp


# -- memory probes -----------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- workers (each runs in a fresh process) ----------------------------------------------
def _memory_config(a: dict):
    from fwpkm import MemoryConfig

    return MemoryConfig(heads=a["heads"], topk=a["topk"], n_subkeys=a["n_subkeys"], k_dim=a["dim"], v_dim=a["dim"],
                        chunk_size=a["chunk"], backend=a["backend"])


def worker_train(a: dict) -> dict:
    """Training steps of one layer: forward (meta-gradient graph) + backward into q, v, gates."""
    import dataclasses

    import torch

    from fwpkm import FwPKMMemory

    if a["threads"]:
        torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    device = torch.device(a.get("device", "cpu"))
    rss0 = rss_bytes()
    mem = FwPKMMemory(_memory_config(a)).train().to(device)
    state_bytes = sum(t.numel() * t.element_size() for t in (mem.keys, mem.values))
    B, T, H, dk, dv = a["batch"], a["seq"], a["heads"], a["dim"], a["dim"]
    g = torch.Generator().manual_seed(1)
    # stand-ins for the block's projections: leaves that receive the meta-gradients
    q = torch.randn(B, T, H * dk, generator=g).to(device).requires_grad_(True)
    v = torch.randn(B, T, dv, generator=g).to(device).requires_grad_(True)
    gates = torch.rand(B, T, generator=g).to(device).requires_grad_(True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    if a["impl"] == "ours":
        def forward():
            return mem(q, v, gates).output

        def backward(out):
            out.square().mean().backward()

        def step():
            backward(forward())
    else:
        from fwpkm import naive

        cfg = dataclasses.asdict(mem.config)
        state = {"keys": mem.keys.clone(), "values": mem.values.clone()}
        del mem  # the dense implementation holds the table itself

        def step():
            out, K, V = naive.run(state["keys"], state["values"], q, v, gates, None, cfg, a["chunk"])
            out.square().mean().backward()
            state["keys"], state["values"] = K.detach(), V.detach()  # the new stored state

    parts = {}
    if a.get("parts"):
        step = _timed_parts(forward, backward, parts)
    rss_state = rss_bytes()
    hwm_reset = reset_peak()
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        device0 = torch.cuda.memory_allocated(device)
    times, cpu = [], []
    t_start = time.perf_counter()
    for i in range(a["warmup"] + a["steps"]):
        q.grad = v.grad = gates.grad = None
        if i == a["warmup"]:
            parts.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        t1, c1 = time.perf_counter(), time.process_time()
        if i >= a["warmup"]:
            times.append(t1 - t0)
            cpu.append(c1 - c0)
        if times and t1 - t_start > a["max_s"]:
            break  # a very slow configuration: keep the steps timed so far
    peak = peak_bytes()
    on_device = {}
    if device.type == "cuda":  # the device's peak: state + inputs + what the steps allocate
        on_device = {"device_peak_mib": torch.cuda.max_memory_allocated(device) / MiB,
                     "device_working_mib": (torch.cuda.max_memory_allocated(device) - device0) / MiB}
    return on_device | {
        "impl": a["impl"], "n_subkeys": a["n_subkeys"], "tokens_per_step": B * T, "device": str(device),
        "step_s": times, "cpu_s": cpu,
        "peak_mib": (peak - rss0) / MiB, "working_mib": (peak - rss_state) / MiB,
        "state_mib": state_bytes / MiB, "peak_total_rss_mib": peak / MiB,
        "hwm_reset": hwm_reset, "threads": torch.get_num_threads(),
        "parts_ms": {k: 1e3 * t / len(times) for k, t in parts.items()},
    }


def add_timer(owner, name: str, label: str, acc: dict) -> None:
    """Replace ``owner.name`` by a wrapper that adds its wall-clock seconds into ``acc[label]``."""
    fn = getattr(owner, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[label] = acc.get(label, 0.0) + time.perf_counter() - t0

    setattr(owner, name, timed)


def _timed_parts(forward, backward, acc: dict):
    """A training step (``backward(forward())``) with wall-clock timers adding seconds into
    ``acc``: the sub-key selection and the commit (wrapped where the memory calls them), the
    forward and the backward."""
    from fwpkm import memory
    from kernels import ops

    add_timer(ops, "select_subkeys", "selection", acc)
    add_timer(memory.SparseValues, "commit", "commit", acc)

    def timed_step():
        t0 = time.perf_counter()
        out = forward()
        t1 = time.perf_counter()
        backward(out)
        acc["forward"] = acc.get("forward", 0.0) + t1 - t0
        acc["backward"] = acc.get("backward", 0.0) + time.perf_counter() - t1

    return timed_step


def chunk_activation_bytes(a: dict, batch: int, chunk: int, elt: int = 4) -> dict:
    """Tensors one chunk's no-graph read and write materialise at most (the sparse core's torch path)."""
    H, k, n, dk, dv = a["heads"], a["topk"], a["n_subkeys"], a["dim"], a["dim"]
    C = batch * chunk
    reads = C * H * k
    parts = {
        "inputs q, v, gates": C * (H * dk + dv + 1),
        "sub-key ranking matrix [C, H, 2, n]": C * H * 2 * n,
        "theta_c[read rows] [U <= C*H*k, dv]": reads * dv,
        "row update [U, dv]": reads * dv,
        "output [C, dv]": C * dv,
    }
    return {name: v * elt for name, v in parts.items()}


def worker_stream(a: dict) -> dict:
    """The no-graph path: a long input streamed through one layer in pieces."""
    import torch

    from fwpkm import FwPKMMemory

    if a["threads"]:
        torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    rss0 = rss_bytes()
    mem = FwPKMMemory(_memory_config(a)).eval()
    state_bytes = sum(t.numel() * t.element_size() for t in (mem.keys, mem.values))
    B, H, dk, dv, piece = a["batch"], a["heads"], a["dim"], a["dim"], a["piece"]
    gen = torch.Generator().manual_seed(1)

    def make_piece(n_tok):  # generated on the fly: the long input itself is not held
        q = torch.randn(B, n_tok, H * dk, generator=gen)
        v = torch.randn(B, n_tok, dv, generator=gen)
        return q, v, torch.rand(B, n_tok, generator=gen)

    rss_state = rss_bytes()
    hwm_reset = reset_peak()
    stream = mem.new_stream()
    checksum, fed, first_chunk_peak = 0.0, 0, None
    t0 = time.perf_counter()
    with torch.no_grad():
        while fed < a["tokens"]:
            n_tok = min(piece, a["tokens"] - fed)
            out = mem(*make_piece(n_tok), stream=stream).output
            checksum += float(out.double().sum())
            fed += n_tok
            if first_chunk_peak is None and fed >= a["chunk"]:
                first_chunk_peak = peak_bytes()
        mem.flush(stream)
    elapsed = time.perf_counter() - t0
    peak = peak_bytes()
    act = chunk_activation_bytes(a, B, a["chunk"])
    bound = state_bytes + sum(act.values())
    return {
        "mode": "stream", "n_subkeys": a["n_subkeys"], "slots": a["n_subkeys"] ** 2, "tokens": fed,
        "batch": B, "piece": piece, "chunk": a["chunk"], "seconds": elapsed, "tok_s": B * fed / elapsed,
        "state_mib": state_bytes / MiB, "chunk_activations_mib": sum(act.values()) / MiB,
        "chunk_activations_detail_mib": {k: v / MiB for k, v in act.items()},
        "first_chunk_peak_mib": (first_chunk_peak - rss0) / MiB,
        "peak_mib": (peak - rss0) / MiB, "working_mib": (peak - rss_state) / MiB,
        "peak_over_state_plus_chunk": (peak - rss0) / bound,
        "checksum": checksum, "hwm_reset": hwm_reset, "threads": torch.get_num_threads(),
    }


# -- driver --------------------------------------------------------------------------------
def run_worker(kind: str, args: dict, timeout: float, precise_malloc: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", kind, json.dumps(args)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for key in PRECISE_MALLOC:
        env.pop(key, None)
    if precise_malloc:
        env.update(PRECISE_MALLOC)
    if OMP_WAIT_POLICY:
        env["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    if THP:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
    return {"error": f"{reason}: {' | '.join(tail)}"}


def _fmt(x, spec):
    return "skipped" if x is None else format(x, spec)


def _train_args(ns) -> dict:
    return dict(heads=ns.heads, topk=ns.topk, dim=ns.dim, chunk=ns.chunk, batch=ns.batch, seq=ns.seq,
                backend=ns.backend, threads=ns.threads, max_s=ns.max_s, malloc=ns.malloc, device=ns.device)


IMPLS = ("ours", "dense")  # the sparse core; fwpkm.naive, the dense baseline


def mode_train(ns) -> list[dict]:
    common = _train_args(ns)
    print(f"train: B={ns.batch} T={ns.seq} chunk={ns.chunk} dk=dv={ns.dim} heads={ns.heads} topk={ns.topk}; "
          f"ours: {ns.steps} timed steps (+{ns.warmup} warm-up) x {ns.rounds} round(s); dense baseline "
          f"(fwpkm.naive): {ns.dense_steps} (+{ns.dense_warmup}); backend {ns.backend}"
          + ("; THP on" if ns.thp else "") + f"; allocator {ns.malloc}", flush=True)
    results = {(n, key): {"time": [], "memory": None} for n in ns.n_subkeys for key in IMPLS}

    def skip(n, key):
        return key == "dense" and n > ns.dense_max_n

    for r in range(ns.rounds):
        for n in ns.n_subkeys:
            for key in IMPLS:
                if skip(n, key) or (key == "dense" and r > 0):
                    continue  # the dense baseline is timed in the first round only (it is slow)
                steps = (ns.warmup, ns.steps) if key == "ours" else (ns.dense_warmup, ns.dense_steps)
                res = run_worker("train", common | {"impl": key, "n_subkeys": n, "warmup": steps[0],
                                                    "steps": steps[1]}, ns.timeout, precise_malloc=False)
                results[n, key]["time"].append(res)
                msg = res.get("error") or (f"{res['tokens_per_step'] / statistics.median(res['step_s']):.0f} tok/s "
                                           f"(median of {len(res['step_s'])} steps)")
                print(f"  [time {r + 1}/{ns.rounds}] N={n}^2 {key:>9}: {msg}", flush=True)
    for n in ns.n_subkeys:
        for key in IMPLS:
            if skip(n, key):
                continue
            if ns.device != "cpu":  # the device's own peak, from the timing run: no separate memory run
                results[n, key]["memory"] = results[n, key]["time"][0]
                continue
            res = run_worker("train", common | {"impl": key, "n_subkeys": n, "warmup": 1, "steps": 1},
                             ns.timeout, precise_malloc=True)
            results[n, key]["memory"] = res
            msg = res.get("error") or f"peak {res['peak_mib']:.0f} MiB (state {res['state_mib']:.0f} MiB)"
            print(f"  [memory] N={n}^2 {key:>9}: {msg}", flush=True)

    rows = []
    for n in ns.n_subkeys:
        row = {"n_subkeys": n, "slots": n * n}
        for key in IMPLS:
            if skip(n, key):
                row[key] = {"skipped": f"n_subkeys {n} > --dense-max-n {ns.dense_max_n}"}
                continue
            runs = [t for t in results[n, key]["time"] if "error" not in t]
            mem = results[n, key]["memory"]
            errors = [t["error"] for t in results[n, key]["time"] if "error" in t]
            if mem is not None and "error" in mem:
                errors.append("memory run: " + mem["error"])
            if not runs or mem is None or "error" in mem:
                row[key] = {"error": "; ".join(errors) or "no result"}
                continue
            steps = [x for t in runs for x in t["step_s"]]
            tokens = runs[0]["tokens_per_step"]
            row[key] = {
                "impl": key, "steps_timed": len(steps), "step_s": steps,
                "tok_s": tokens / statistics.median(steps), "tok_s_best": tokens / min(steps),
                "cpu_s_per_step": statistics.median([x for t in runs for x in t["cpu_s"]]),
                "peak_mib": mem.get("device_peak_mib", mem["peak_mib"]),  # CUDA: the device's memory
                "working_mib": mem.get("device_working_mib", mem["working_mib"]), "state_mib": mem["state_mib"],
                "rss_default_malloc_mib": max(t["peak_mib"] for t in runs), "hwm_reset": mem["hwm_reset"],
                "errors": errors,
            }
        rows.append(row)
    return rows


def flat_train_rows(rows) -> list[dict]:
    flat = []
    for r in rows:
        o, d = r["ours"], r["dense"]
        ok = lambda x: x if "tok_s" in x else None
        o_, d_ = ok(o), ok(d)
        get = lambda x, k: None if x is None else x[k]
        flat.append({
            "N": f"{r['n_subkeys']}^2", "slots": r["slots"], "state_mib": get(o_, "state_mib"),
            "ours_tok_s": get(o_, "tok_s"), "ours_tok_s_best": get(o_, "tok_s_best"),
            "ours_cpu_s_per_step": get(o_, "cpu_s_per_step"),
            "ours_peak_mib": get(o_, "peak_mib"), "ours_working_mib": get(o_, "working_mib"),
            "ours_rss_default_malloc_mib": get(o_, "rss_default_malloc_mib"),
            "dense_tok_s": get(d_, "tok_s"), "dense_tok_s_best": get(d_, "tok_s_best"),
            "dense_cpu_s_per_step": get(d_, "cpu_s_per_step"),
            "dense_peak_mib": get(d_, "peak_mib"), "dense_working_mib": get(d_, "working_mib"),
            "dense_rss_default_malloc_mib": get(d_, "rss_default_malloc_mib"),
            "speedup": o_ and d_ and o_["tok_s"] / d_["tok_s"],
            "peak_ratio": o_ and d_ and o_["peak_mib"] / d_["peak_mib"],
            "dense_note": None if d_ else (d.get("skipped") or d.get("error")),
            "ours_note": None if o_ else o.get("error"),
        })
    return flat


def train_table(flat) -> str:
    head = (f"{'N':>7} | {'ours tok/s':>10} {'(best)':>8} {'peak MiB':>9} | {'dense tok/s':>11} {'(best)':>8} "
            f"{'peak MiB':>9} | {'speed-up':>8} {'peak ratio':>10}")
    lines = [head, "-" * len(head)]
    for r in flat:
        speed = "skipped" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        lines.append(f"{r['N']:>7} | {_fmt(r['ours_tok_s'], '10.0f')} {_fmt(r['ours_tok_s_best'], '8.0f')} "
                     f"{_fmt(r['ours_peak_mib'], '9.0f')} | {_fmt(r['dense_tok_s'], '11.0f')} "
                     f"{_fmt(r['dense_tok_s_best'], '8.0f')} {_fmt(r['dense_peak_mib'], '9.0f')} | "
                     f"{speed:>8} {_fmt(r['peak_ratio'], '10.3f')}")
    ours = [r for r in flat if r["ours_tok_s"]]
    if len(ours) >= 2:
        a, b = ours[0], ours[-1]
        for key, label in (("ours_tok_s", "median"), ("ours_tok_s_best", "best")):
            lines.append(f"ours ({label} step): tokens/s from N={a['N']} to N={b['N']}: {a[key]:.0f} -> {b[key]:.0f} "
                         f"({100 * (1 - b[key] / a[key]):.1f}% lower)")
    return "\n".join(lines)


PARTS = (("selection_ms", "sub-key selection"), ("commit_ms", "commit"), ("forward_rest_ms", "rest of forward"),
         ("backward_ms", "backward"), ("step_ms", "whole step"))


def mode_parts(ns) -> list[dict]:
    print(f"parts: B={ns.batch} T={ns.seq} chunk={ns.chunk} dk=dv={ns.dim} heads={ns.heads} topk={ns.topk}; "
          f"{ns.steps} timed steps (+{ns.warmup} warm-up); allocator {ns.malloc}", flush=True)
    rows = []
    for n in ns.n_subkeys:
        res = run_worker("train", _train_args(ns) | {"impl": "ours", "n_subkeys": n, "parts": True,
                                                     "warmup": ns.warmup, "steps": ns.steps},
                         ns.timeout, precise_malloc=False)
        row = {"N": f"{n}^2", "slots": n * n}
        if "error" in res:
            print(f"  N={n}^2: {res['error']}", flush=True)
            rows.append(row | {"error": res["error"]})
            continue
        t = {"selection": 0.0, "commit": 0.0} | res["parts_ms"]  # parts inside the forward
        row |= {"selection_ms": t["selection"], "commit_ms": t["commit"],
                "forward_rest_ms": t["forward"] - t["selection"] - t["commit"], "backward_ms": t["backward"],
                "step_ms": t["forward"] + t["backward"], "tokens_per_step": res["tokens_per_step"]}
        print(f"  N={n}^2: {row['step_ms']:.1f} ms per step", flush=True)
        rows.append(row)
    return rows


def parts_table(rows) -> str:
    ok = [r for r in rows if "error" not in r]
    head = f"{'ms per step':>18} | " + " | ".join(f"{r['N']:>8}" for r in ok)
    lines = [head, "-" * len(head)]
    for key, label in PARTS:
        lines.append(f"{label:>18} | " + " | ".join(f"{r[key]:8.1f}" for r in ok))
    return "\n".join(lines)


def mode_stream(ns) -> dict:
    args = dict(heads=ns.heads, topk=ns.topk, dim=ns.dim, chunk=ns.chunk, batch=ns.stream_batch,
                backend=ns.backend, threads=ns.threads, n_subkeys=ns.n_subkeys[0], tokens=ns.tokens,
                piece=ns.piece, malloc=ns.malloc)
    print(f"stream: N={args['n_subkeys']}^2, {ns.tokens} tokens x batch {ns.stream_batch} in pieces of "
          f"{ns.piece}, chunk {ns.chunk}, eval (no graph)", flush=True)
    res = run_worker("stream", args, ns.timeout, precise_malloc=True)  # memory
    if "error" in res:
        return res
    timing = run_worker("stream", args, ns.timeout, precise_malloc=False)  # time, --malloc allocator
    if "error" in timing:
        return timing
    res["tok_s_precise_malloc_run"], res["seconds_precise_malloc_run"] = res["tok_s"], res["seconds"]
    res["tok_s"], res["seconds"] = timing["tok_s"], timing["seconds"]
    res["peak_default_malloc_mib"] = timing["peak_mib"]
    return res


def stream_report(res) -> str:
    if "error" in res:
        return "  error: " + res["error"]
    return "\n".join([
        f"  {res['tok_s']:.0f} tokens/s ({res['seconds']:.1f} s)",
        f"  state {res['state_mib']:.1f} MiB + one chunk's activations {res['chunk_activations_mib']:.1f} MiB "
        f"= {res['state_mib'] + res['chunk_activations_mib']:.1f} MiB",
        f"  peak {res['peak_mib']:.1f} MiB (after the first chunk: {res['first_chunk_peak_mib']:.1f} MiB) "
        f"= {res['peak_over_state_plus_chunk']:.2f} x (state + one chunk); with the default allocator: "
        f"{res['peak_default_malloc_mib']:.1f} MiB",
    ])


def write(out: Path, name: str, payload, flat: list[dict] | None):
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if flat:
        with open(out / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(flat[0].keys()))
            w.writeheader()
            for r in flat:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"wrote {out / (name + '.json')}" + (f" and {out / (name + '.csv')}" if flat else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Modes"):])
    p.add_argument("mode", choices=["train", "parts", "stream"])
    p.add_argument("--n-subkeys", type=int, nargs="+", default=None,
                   help="sub-keys per half n (N = n^2 slots); train and parts default: 128 256 512 1024, "
                        "stream: 512")
    p.add_argument("--dim", type=int, default=512, help="dk = dv (default 512)")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--batch", type=int, default=2, help="train: batch size B (default 2)")
    p.add_argument("--seq", type=int, default=2048, help="train: sequence length T (default 2048)")
    p.add_argument("--steps", type=int, default=5, help="train: timed steps per run (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="train: untimed steps first (default 2)")
    p.add_argument("--rounds", type=int, default=1,
                   help="train: timing runs of each of our configurations, interleaved (default 1)")
    p.add_argument("--dense-steps", type=int, default=3, help="train: timed steps of the dense baseline (default 3)")
    p.add_argument("--dense-warmup", type=int, default=1, help="train: its untimed steps first (default 1)")
    p.add_argument("--dense-max-n", type=int, default=1024,
                   help="skip the dense baseline for n_subkeys above this (default 1024; at 1024^2 it needs "
                        "~13 GiB of RAM)")
    p.add_argument("--max-s", type=float, default=300.0,
                   help="train: stop a run's timed steps once it has run this many seconds (default 300)")
    p.add_argument("--tokens", type=int, default=131072, help="stream: tokens per sequence (default 131072)")
    p.add_argument("--piece", type=int, default=512, help="stream: tokens per call (default 512)")
    p.add_argument("--stream-batch", type=int, default=1, help="stream: sequences streamed together (default 1)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cpu"],
                   help="kernels of the sparse core (auto: Triton on CUDA, the C++ kernels on the CPU, else PyTorch)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--device", default="cpu", help="train and parts: cpu or cuda (default cpu); on CUDA the peak "
                                                     "is the device memory's (torch.cuda.max_memory_allocated)")
    p.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "inherit"],
                   help="OMP_WAIT_POLICY of the workers (default passive: idle OpenMP threads sleep instead of "
                        "spinning, which keeps timings sane when other processes share the cores)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess (default 3600)")
    p.add_argument("--thp", action="store_true",
                   help="run the workers with THP_MEM_ALLOC_ENABLE=1: PyTorch backs CPU tensors >= 2 MiB with "
                        "transparent huge pages, which cuts TLB misses of random row accesses to a large table")
    p.add_argument("--malloc", default="default", choices=["default", "tuned"],
                   help="glibc allocator of the timing runs: its own settings (default) or lit.runtime's "
                        "tuned ones, as fwpkm train uses them (freed blocks kept for reuse, fewer page faults)")
    p.add_argument("--tag", default="", help="suffix of the output file names (<mode><tag>.csv/.json)")
    p.add_argument("--out", type=Path, default=None, help="directory for <mode>.csv / <mode>.json")
    ns = p.parse_args(argv)
    global OMP_WAIT_POLICY, THP
    OMP_WAIT_POLICY = None if ns.omp_wait_policy == "inherit" else ns.omp_wait_policy.upper()
    THP = ns.thp
    if ns.n_subkeys is None:
        ns.n_subkeys = [512] if ns.mode == "stream" else [128, 256, 512, 1024]
    meta = {"command": " ".join([Path(sys.executable).name] + sys.argv), "cpu_count": os.cpu_count(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_before": os.getloadavg()}
    try:
        import torch

        meta["torch"] = torch.__version__
    except ImportError:
        pass
    if ns.mode == "train":
        rows = mode_train(ns)
        meta["load_average_after"] = os.getloadavg()
        flat = flat_train_rows(rows)
        table = train_table(flat)
        print("\n" + table)
        if ns.out:
            write(ns.out, "train" + ns.tag, {"meta": meta, "args": vars(ns), "table": flat, "rows": rows}, flat)
    elif ns.mode == "parts":
        rows = mode_parts(ns)
        meta["load_average_after"] = os.getloadavg()
        print("\n" + parts_table(rows))
        if ns.out:
            write(ns.out, "parts" + ns.tag, {"meta": meta, "args": vars(ns), "table": rows}, rows)
    else:
        res = mode_stream(ns)
        meta["load_average_after"] = os.getloadavg()
        print(stream_report(res))
        if ns.out:
            flat = [{k: v for k, v in res.items() if not isinstance(v, dict)}] if "error" not in res else None
            write(ns.out, "stream" + ns.tag, {"meta": meta, "args": vars(ns), "result": res}, flat)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        kind, worker_args = sys.argv[2], json.loads(sys.argv[3])
        if worker_args.get("malloc") == "tuned" and not any(k in os.environ for k in PRECISE_MALLOC):
            from lit.runtime import tune_allocator

            tune_allocator("tuned")
        result = worker_train(worker_args) if kind == "train" else worker_stream(worker_args)
        print("RESULT " + json.dumps(result), flush=True)
    else:
        main()
