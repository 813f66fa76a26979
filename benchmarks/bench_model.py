#!/usr/bin/env python
"""Time a full training step of the models the grids train: tokens/s and peak memory.

Modes
-----
train   One training step -- forward, backward, gradient clipping and the AdamW step, as
        ``fwpkm train`` takes it -- of each model at each thread count, side by side in one
        run: every (model, threads, round) in its own fresh process, rounds interleaved.
        A model is ``GRID:VARIANT`` (the grid's base config with the variant's overrides:
        model, batch size and sequence length) or ``preset:NAME`` (the preset with the
        ``tiny`` run's data shape), optionally with ``@BACKEND`` (the memory's kernels:
        auto, torch, cpu or triton; e.g. ``recall:fwpkm@torch``). Each model is also compared
        with its grid's model without memory (``overhead``: its step time over that model's,
        same threads).
parts   The FwPKM model's step split into the memory's reads, writes (the inner
        gradient step, keys and values), commits, the rest of the forward, the backward,
        and the optimizer; beside it the same split of the model without memory, so that
        the backward's extra time -- the meta-gradient through the writes -- is the
        difference of the two backwards.

Inputs are random token ids (the models are untrained, so the memory's reads are spread like
a fresh model's). Steps run with ``lit.runtime``'s allocator settings, as ``fwpkm train`` runs
them (``--malloc default`` for glibc's own). Time: wall-clock seconds per step after
``--warmup`` untimed steps; the median step and the best step (other processes only add time,
so the best step is the closer estimate of the cost). Memory: the process's peak resident set
during the steps (VmHWM, reset once the model and optimizer exist) minus the resident set
before the model was built. The 1-minute load average before and after is recorded.

Examples
--------
    python benchmarks/bench_model.py train --out benchmarks/results
    python benchmarks/bench_model.py train --models recall:swa_only recall:fwpkm --threads 1 --steps 10
    python benchmarks/bench_model.py train --models recall:swa_only recall:fwpkm@torch recall:fwpkm@cpu --threads 1
    python benchmarks/bench_model.py parts --model recall:fwpkm --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_memory import MiB, add_timer, peak_bytes, reset_peak, rss_bytes, write  # noqa: E402

DEFAULT_MODELS = ["recall:swa_only", "recall:fwpkm", "recall:fwmlp", "preset:tiny",
                  "mqar:no_memory", "mqar:base", "mqar:fwmlp"]
WITHOUT_MEMORY = {"recall": "swa_only", "mqar": "no_memory"}  # each grid's model without memory
# The data shape of each preset scale's run (configs/tiny.yaml, configs/paper.yaml: 16 x 4096 per device,
# the Mistral tokenizer's 32K ids)
PRESET_DATA = {"tiny": {"seq_len": 256, "batch_size": 8, "tokenizer": "byte"},
               "paper": {"seq_len": 4096, "batch_size": 16, "tokenizer": "ids:32000"}}


def _bad_input(message: str) -> None:
    print(f"bench_model.py: {message}", file=sys.stderr)
    sys.exit(2)


# -- what a model name means -----------------------------------------------------------------
MEMORY_BACKENDS = ("auto", "torch", "cpu", "triton")


def model_setup(name: str) -> dict:
    """``GRID:VARIANT`` or ``preset:NAME``, optionally ``@BACKEND`` -> {model section, optim, seq_len,
    batch_size, vocab_size, baseline}: the baseline is the grid's variant without memory (None for presets)."""
    name, _, backend = name.partition("@")
    if backend and backend not in MEMORY_BACKENDS:
        _bad_input(f"--models: backend {backend!r} of {name}@{backend} is not one of {', '.join(MEMORY_BACKENDS)}")
    kind, _, which = name.partition(":")
    if kind == "preset" and which.split("-")[0] not in PRESET_DATA:
        _bad_input(f"--models: preset {which!r} is not a tiny-... or paper-... preset")
    if not which:
        _bad_input(f"--models: {name!r} is not GRID:VARIANT or preset:NAME")
    if kind == "preset":
        config = {"model": {"preset": which}, "data": dict(PRESET_DATA[which.split("-")[0]])}
        baseline = None
    else:
        from ablations.grid import apply, load_grid

        grid = load_grid(kind)
        variant = grid.aliases.get(which, which)
        if variant not in grid.variants:
            _bad_input(f"--models: grid {kind} has no variant {which!r}; it has {', '.join(grid.order)}")
        config = apply(grid.base, grid.variants[variant])
        baseline = f"{kind}:{WITHOUT_MEMORY[kind]}" if kind in WITHOUT_MEMORY else None
    data = config.get("data", {})
    if backend:
        config["model"] = {**config.get("model", {}), "block.memory.backend": backend}
    return {"model": config.get("model", {}), "optim": config.get("optim", {}),
            "seq_len": int(data.get("seq_len", 256)), "batch_size": int(data.get("batch_size", 8)),
            "tokenizer": str(data.get("tokenizer", "byte")), "baseline": baseline}


def build(name: str, device: str = "cpu"):
    """(model, optimizer, grad_clip, batch size, seq_len, vocab size) of a model name."""
    import torch

    from fwpkm import HybridLM
    from lit.config import OptimConfig, resolve_model
    from lit.module import parameter_groups
    from lit.tokenizer import load_tokenizer

    setup = model_setup(name)
    vocab = load_tokenizer(setup["tokenizer"]).vocab_size
    model = HybridLM(resolve_model(setup["model"], vocab_size=vocab)[1]).train().to(device)
    optim = OptimConfig(**{k: v for k, v in setup["optim"].items() if k in OptimConfig.__dataclass_fields__})
    optimizer = torch.optim.AdamW(parameter_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                                  eps=optim.eps, weight_decay=optim.weight_decay)
    return model, optimizer, optim.grad_clip, setup["batch_size"], setup["seq_len"], vocab


# -- workers (each in a fresh process) ---------------------------------------------------------
def worker(a: dict) -> dict:
    import torch

    from lit.module import memory_stats

    from fwpkm.costs import flops_per_token

    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    device = torch.device(a["device"])
    rss0 = rss_bytes()
    model, optimizer, clip, B, T, vocab = build(a["model"], a["device"])
    gen = torch.Generator().manual_seed(1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a["precision"] == "bf16-mixed")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    parts: dict = {}
    if a["parts"]:
        _install_timers(parts)

    def timed(label, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            parts[label] = parts.get(label, 0.0) + time.perf_counter() - t0

    def step():
        ids = torch.randint(0, vocab, (B, T + 1), generator=gen).to(device)

        def forward():
            with autocast:
                return model(ids[:, :-1], labels=ids[:, 1:])
        out = timed("forward", forward)
        memory_stats(out)  # the training step logs them
        timed("backward", out.loss.backward)

        def update():
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        timed("optimizer", update)

    times, cpu = [], []
    hwm_reset = reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(a["warmup"] + a["steps"]):
        if i == a["warmup"]:
            parts.clear()
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        t1, c1 = time.perf_counter(), time.process_time()
        if i >= a["warmup"]:
            times.append(t1 - t0)
            cpu.append(c1 - c0)
    n_params = sum(p.numel() for p in model.parameters())
    memory_slots = sum(m.values.shape[0] for m in model.fast_weight_memories().values()
                       if hasattr(m, "values"))
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_bytes() - rss0) / MiB
    return {"model": a["model"], "threads": torch.get_num_threads(), "tokens_per_step": B * T,
            "device": str(device), "precision": a["precision"],
            "train_flops_per_token": 3 * flops_per_token(model.config, T),  # forward + backward (2x)
            "step_s": times, "cpu_s": cpu, "peak_mib": peak, "hwm_reset": hwm_reset,
            "parameters": n_params, "memory_slots": memory_slots,
            "parts_ms": {k: 1e3 * v / len(times) for k, v in parts.items()}}


def _install_timers(acc: dict) -> None:
    """Wall-clock timers around the fast-weight memories' read, write and commit steps."""
    from fwpkm.fwmlp import FwMLPMemory
    from fwpkm.memory import FwPKMMemory

    for cls in (FwPKMMemory, FwMLPMemory):
        for step in ("read", "write", "commit"):
            add_timer(cls, f"_{step}", f"memory_{step}", acc)


# -- driver ----------------------------------------------------------------------------------
def run_worker(args: dict, ns) -> dict:
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(args["threads"]), OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", json.dumps(args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ns.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": args["model"], "threads": args["threads"], "error": f"timed out after {ns.timeout:.0f} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return {"model": args["model"], "threads": args["threads"], "error": f"exit {proc.returncode}: {tail}"}


def measure(models: list[str], ns, parts: bool = False) -> dict:
    """(model, threads) -> merged result over the rounds (interleaved)."""
    results: dict = {}
    total = ns.rounds * len(models) * len(ns.threads)
    done = 0
    for r in range(ns.rounds):
        for threads in ns.threads:
            for model in models:
                args = {"model": model, "threads": threads, "steps": ns.steps, "warmup": ns.warmup, "parts": parts,
                        "malloc": ns.malloc, "device": ns.device, "precision": ns.precision}
                res = run_worker(args, ns)
                done += 1
                print(f"[{done}/{total}] round {r + 1} {model} x{threads} thread(s): "
                      + (res["error"] if "error" in res else
                         f"{res['tokens_per_step'] / statistics.median(res['step_s']):,.0f} tokens/s"), flush=True)
                key = (model, threads)
                if "error" in res:
                    results.setdefault(key, res)
                    continue
                if key not in results or "error" in results[key]:
                    results[key] = dict(res, rounds_peak_mib=[res["peak_mib"]])
                    continue
                merged = results[key]
                merged["step_s"] += res["step_s"]
                merged["cpu_s"] += res["cpu_s"]
                merged["rounds_peak_mib"].append(res["peak_mib"])
                merged["peak_mib"] = max(merged["peak_mib"], res["peak_mib"])
                for k, v in res["parts_ms"].items():  # the mean over rounds of the per-step means
                    merged["parts_ms"][k] = (merged["parts_ms"][k] * r + v) / (r + 1)
    return results


def train_rows(results: dict, baselines: dict, peak_tflops: float = 0.0) -> list[dict]:
    rows = []
    for (model, threads), res in results.items():
        row = {"model": model, "threads": threads}
        if "error" in res:
            rows.append(row | {"error": res["error"]})
            continue
        tokens, median, best = res["tokens_per_step"], statistics.median(res["step_s"]), min(res["step_s"])
        row |= {"tokens_per_step": tokens, "tok_s_median": tokens / median, "tok_s_best": tokens / best,
                "step_ms_median": 1e3 * median, "cpu_s_per_step": statistics.median(res["cpu_s"]),
                "peak_mib": res["peak_mib"], "parameters": res["parameters"], "memory_slots": res["memory_slots"],
                "timed_steps": len(res["step_s"]), "device": res["device"], "precision": res["precision"],
                "model_tflop_s": res["train_flops_per_token"] * tokens / median / 1e12}
        if peak_tflops:
            row["mfu"] = row["model_tflop_s"] / peak_tflops
        base = results.get((baselines.get(model), threads))
        if base and "error" not in base and baselines.get(model) != model:
            row["baseline"] = baselines[model]
            row["overhead_median"] = median / statistics.median(base["step_s"])
            row["overhead_best"] = best / min(base["step_s"])
        rows.append(row)
    return rows


def train_table(rows: list[dict]) -> str:
    lines = ["| model | threads | tok/s (median / best) | step ms | peak MiB | model TFLOP/s (MFU) "
             "| x model without memory (median / best) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['threads']} | {r['error']} | | | | |")
            continue
        over = (f"{r['overhead_median']:.2f}x / {r['overhead_best']:.2f}x vs {r['baseline']}"
                if "overhead_median" in r else "-")
        flops = f"{r['model_tflop_s']:.3g}" + (f" ({100 * r['mfu']:.1f}%)" if "mfu" in r else "")
        lines.append(f"| {r['model']} | {r['threads']} | {r['tok_s_median']:,.0f} / {r['tok_s_best']:,.0f} | "
                     f"{r['step_ms_median']:.1f} | {r['peak_mib']:.0f} | {flops} | {over} |")
    return "\n".join(lines)


PART_ORDER = ("memory_read", "memory_write", "memory_commit", "forward_rest", "backward", "optimizer")


def parts_rows(results: dict, model: str, baseline: str | None) -> list[dict]:
    rows = []
    for (name, threads), res in results.items():
        if "error" in res:
            rows.append({"model": name, "threads": threads, "error": res["error"]})
            continue
        p = dict(res["parts_ms"])
        memory = sum(p.get(k, 0.0) for k in PART_ORDER[:3])
        p["forward_rest"] = p.pop("forward") - memory
        row = {"model": name, "threads": threads, **{f"{k}_ms": p.get(k, 0.0) for k in PART_ORDER}}
        row["step_ms"] = sum(row[f"{k}_ms"] for k in PART_ORDER)
        rows.append(row)
    by = {(r["model"], r["threads"]): r for r in rows}
    for r in rows:
        base = by.get((baseline, r["threads"]))
        if r["model"] == model and base and "error" not in base and "error" not in r:
            r["backward_over_baseline_ms"] = r["backward_ms"] - base["backward_ms"]  # the meta-gradient's share
    return rows


def parts_table(rows: list[dict]) -> str:
    head = "| model | threads | " + " | ".join(k.replace("_", " ") + " ms" for k in PART_ORDER)
    lines = [head + " | step ms | backward - baseline's ms |", "|---" * (len(PART_ORDER) + 4) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['threads']} | {r['error']} |")
            continue
        extra = f"{r['backward_over_baseline_ms']:.1f}" if "backward_over_baseline_ms" in r else "-"
        lines.append(f"| {r['model']} | {r['threads']} | " + " | ".join(f"{r[k + '_ms']:.1f}" for k in PART_ORDER)
                     + f" | {r['step_ms']:.1f} | {extra} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Modes"):])
    p.add_argument("mode", choices=["train", "parts"])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                   help=f"train: GRID:VARIANT or preset:NAME (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--model", default="recall:fwpkm", help="parts: the memory model (default recall:fwpkm)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (default: 1 2)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per process (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="processes per (model, threads), interleaved (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu); on CUDA the peak is the device's")
    p.add_argument("--precision", default="32", choices=["32", "bf16-mixed"],
                   help="32 (default) or bf16-mixed (autocast to bfloat16, as trainer.precision)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's peak TFLOP/s for this precision: adds model FLOP utilisation (MFU) to the "
                        "table (e.g. 989 for an H100/H200's dense bf16)")
    p.add_argument("--malloc", default="tuned", choices=["tuned", "default"],
                   help="allocator: lit.runtime's settings as fwpkm train uses them (default), or glibc's own")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per process (default 1800)")
    p.add_argument("--tag", default="", help="suffix of the output names (model_<mode><tag>.csv/.json)")
    p.add_argument("--out", type=Path, default=None, help="directory for model_<mode>.csv / .json")
    ns = p.parse_args(argv)
    meta = {"command": " ".join(["python"] + sys.argv), "cpu_count": os.cpu_count(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_before": os.getloadavg()[0]}
    if ns.mode == "train":
        models = list(dict.fromkeys(ns.models))
        baselines = {m: model_setup(m)["baseline"] for m in models}
        results = measure(list(dict.fromkeys(models + [b for b in baselines.values() if b])), ns)
        rows = train_rows(results, baselines, ns.peak_tflops)
        table = train_table(rows)
    else:
        baseline = model_setup(ns.model)["baseline"]
        results = measure([ns.model] + ([baseline] if baseline else []), ns, parts=True)
        rows = parts_rows(results, ns.model, baseline)
        table = parts_table(rows)
    meta["load_average_after"] = os.getloadavg()[0]
    print(f"\nload average (1 min) before / after: {meta['load_average_before']:.2f} / {meta['load_average_after']:.2f}")
    print(table)
    if ns.out:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        write(ns.out, f"model_{ns.mode}{ns.tag}", {"meta": meta, "args": {k: str(v) for k, v in vars(ns).items()},
                                                   "table": rows}, [{k: r.get(k, "") for k in keys} for r in rows])
        (ns.out / f"model_{ns.mode}{ns.tag}.md").write_text(f"    {meta['command']}\n\n{table}\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_args = json.loads(sys.argv[2])
        if worker_args.get("malloc") == "tuned":
            from lit.runtime import tune_allocator

            tune_allocator("tuned")
        print("RESULT " + json.dumps(worker(worker_args)), flush=True)
    else:
        main()
