"""The benchmark scripts run and report what they say: the full-model step benchmark
(benchmarks/bench_model.py) and the GPU check (benchmarks/gpu_check.sh), whose every step runs on
the CPU at tiny sizes (Triton's interpreter for the kernels). Speed itself is not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_model_splits_the_step_and_compares_with_the_model_without_memory(tmp_path):
    script = ROOT / "benchmarks" / "bench_model.py"
    few = ["--threads", "1", "--steps", "2", "--warmup", "0", "--rounds", "1", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(script), "parts", "--model", "mqar:base", *few],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["model"]: r for r in json.loads((tmp_path / "model_parts.json").read_text())["table"]}
    fwpkm, plain = rows["mqar:base"], rows["mqar:no_memory"]  # the grid's model without memory beside it
    parts = ("memory_read_ms", "memory_write_ms", "memory_commit_ms", "forward_rest_ms", "backward_ms", "optimizer_ms")
    assert all(fwpkm[p] > 0 for p in parts)
    assert fwpkm["step_ms"] == pytest.approx(sum(fwpkm[p] for p in parts))
    assert plain["memory_read_ms"] == plain["memory_write_ms"] == 0.0  # no memory, nothing timed there
    assert fwpkm["backward_over_baseline_ms"] == pytest.approx(fwpkm["backward_ms"] - plain["backward_ms"])
    assert (tmp_path / "model_parts.csv").read_text().startswith("model,threads,")

    proc = subprocess.run([sys.executable, str(script), "train", "--models", "mqar:nope", *few],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "grid mqar has no variant 'nope'; it has base, dot" in proc.stderr


def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    """GPU_CHECK_DEVICE=cpu --quick: the same seven steps at tiny sizes, each result written; the
    bandwidth step rates the layer benchmark's rows and the model step reports FLOP/s."""
    env = dict(os.environ, GPU_CHECK_DEVICE="cpu", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=env)
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:]
    steps = [line.split()[0] for line in summary.splitlines()]
    assert steps == ["env", "tests", "kernels", "layer", "bandwidth", "model", "gdn"]
    assert all(" ok " in line for line in summary.splitlines()), summary
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert kernels["ok"] and kernels["select_subkeys"]["same_ids"] == 1.0
    assert kernels["layer_train_step"]["grad_q"]["ok"]  # the Triton backend's meta-gradients match torch's
    layer = json.loads((tmp_path / "train.json").read_text())["table"][0]  # bench_memory.py train
    assert layer["ours_tok_s"] > 0 and layer["dense_tok_s"] > 0 and layer["ours_peak_mib"] > 0
    bandwidth = json.loads((tmp_path / "bandwidth.json").read_text())
    assert bandwidth["copy_gb_s"] > 0 and {r["impl"] for r in bandwidth["layer"]} == {"ours", "dense"}
    model = json.loads((tmp_path / "model_train.json").read_text())["table"][0]
    assert model["model"] == "preset:tiny" and model["model_tflop_s"] > 0 and 0 < model["mfu"] < 1

    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "unknown option --fast" in bad.stderr
