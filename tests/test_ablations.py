"""Ablation grids, the grid runner, Optuna studies and reports (ablations/): CPU only, micro models.

The end-to-end tests run ``python -m ablations ablate|tune`` as subprocesses with a tmp runs
folder and a tmp SQLite MLflow store (``MLFLOW_TRACKING_URI``)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ablations.grid import GridError, apply, load_grid, parse_sets, resolve_runs

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300


def env(tmp_path: Path, **extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PL_", "LOCAL_RANK", "NODE_RANK",
                                                                   "FWPKM_"))}
    e.update(PYTHONPATH=str(ROOT), CI="true", OMP_NUM_THREADS="1", MLFLOW_ENABLE_ASYNC_LOGGING="false",
             JSONARGPARSE_DEPRECATION_WARNINGS="off", MLFLOW_TRACKING_URI=store_uri(tmp_path))
    e.update(extra)
    return e


def store_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def fwpkm(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ablations", *args, "--runs-dir", str(tmp_path / "runs")]


def run(tmp_path: Path, *args: str, expect: int | None = 0) -> subprocess.CompletedProcess:
    (tmp_path / "store").mkdir(exist_ok=True)
    proc = subprocess.run(fwpkm(tmp_path, *args), cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True,
                          timeout=TIMEOUT)
    if expect is not None and proc.returncode != expect:
        raise AssertionError(f"{args} exited with {proc.returncode} (expected {expect}):\n"
                             f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store_uri(tmp_path))


def runs_of(tmp_path: Path, filter_string: str = "") -> list:
    c = client(tmp_path)
    ids = [e.experiment_id for e in c.search_experiments()]
    return list(c.search_runs(ids, filter_string, max_results=1000))


def write_grid(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------- grids as data (no training)


def test_override_algebra_and_grid_files(tmp_path):
    base = {"model": {"preset": "tiny", "d_model": 32, "block.memory.topk": 4}, "trainer": {"max_steps": 10}}
    out = apply(base, {"model.block.memory.score": "dot", "trainer": {"val_check_interval": 5},
                       "model": {"block": {"memory": {"lookahead": 0}}}, "data.seq_len": 64})
    # model options are merged field by field (never replaced), dotted or nested alike
    assert out["model"] == {"preset": "tiny", "d_model": 32,
                            "block": {"memory": {"topk": 4, "score": "dot", "lookahead": 0}}}
    assert out["trainer"] == {"max_steps": 10, "val_check_interval": 5} and out["data"] == {"seq_len": 64}
    assert base["model"] == {"preset": "tiny", "d_model": 32, "block.memory.topk": 4}  # a copy
    assert apply({}, {"model.block.memory.addr_loss_weight": None}) == {
        "model": {"block": {"memory": {"addr_loss_weight": None}}}}
    assert parse_sets(["trainer.max_steps=100", "data.source=hf:x/y", "a.b=null", "c=[1, 2]"]) == {
        "trainer.max_steps": 100, "data.source": "hf:x/y", "a.b": None, "c": [1, 2]}
    with pytest.raises(GridError, match="KEY=VALUE"):
        parse_sets(["trainer.max_steps"])

    # every ablation of spec section 8 is in each scale, the same names in the same order
    names = ["base", "dot", "lookahead0", "no_target_norm", "no_addr_loss", "no_gate_weighting", "no_gate", "h1k8",
             "h1k32", "h4k8", "mean_mse", "fwmlp", "no_memory"]
    for scale in ("paper", "tiny"):
        grid = load_grid(scale)
        assert grid.order == names and grid.aliases == {"h1k8": "base"}
        no_addr = grid.variants["no_addr_loss"]
        assert no_addr == {"model": {"block": {"memory": {"addr_loss_weight": None, "grad_to_values_only": False}}}}
    smoke = load_grid("smoke")
    assert 3 <= len(smoke.variants) <= 4 and smoke.eval.get("niah")

    # extends: base merged, variants added or dropped; unknown keys and bad aliases are errors
    child = write_grid(tmp_path, {"name": "child", "extends": "smoke", "seeds": [1, 2],
                                  "base": {"trainer.max_steps": 20},
                                  "variants": {"dot": False, "topk2": {"model.block.memory.topk": 2}}})
    grid = load_grid(str(child))
    assert grid.name == "child" and "dot" not in grid.variants and grid.order[-1] == "topk2"
    assert grid.base["trainer"]["max_steps"] == 20 and grid.base["model"]["d_model"] == 32
    specs = resolve_runs(grid, tmp_path / "runs", only=["topk2"])
    assert [(s.variant, s.seed) for s in specs] == [("topk2", 1), ("topk2", 2)]
    assert specs[0].error is None and specs[0].summary["HxK"] == "1x2"  # a plain dotted model path
    assert specs[0].summary["d_model"] == 32  # over the base's own model options
    assert specs[0].config_hash != specs[1].config_hash and specs[0].config["seed_everything"] == 1
    assert specs[0].run_dir == tmp_path / "runs" / "ablations" / "child" / "topk2" / "seed1"
    with pytest.raises(GridError, match="no variant"):
        resolve_runs(grid, tmp_path, only=["nope"])
    bad = write_grid(tmp_path, {"name": "bad", "extends": "smoke", "varaints": {}})
    with pytest.raises(GridError, match="unknown key"):
        load_grid(str(bad))
    bad = write_grid(tmp_path, {"name": "bad2", "extends": "smoke", "variants": {"x": {"same_as": "nope"}}})
    with pytest.raises(GridError, match="not a variant"):
        load_grid(str(bad))


def test_dry_run_resolves_paper_and_tiny_without_building_models(tmp_path, monkeypatch, capsys):
    import fwpkm.model
    from ablations.__main__ import main

    def no_models(*args, **kwargs):
        raise AssertionError("--dry-run built a model")

    monkeypatch.setattr(fwpkm.model.HybridLM, "__init__", no_models)
    for scale, n_runs in (("paper", 12), ("tiny", 36)):
        code = main(["ablate", scale, "--dry-run", "--runs-dir", str(tmp_path / "runs")])
        out = capsys.readouterr().out
        assert code == 0, out
        assert f"{n_runs} valid, 0 invalid" in out
        for variant in load_grid(scale).variants:
            assert f" {variant} " in out
        assert "alias   h1k8" in out and "HxK=4x8" in out and "memory=fwmlp" in out and "memory=none" in out
        assert "addr_loss=None, values_only=False" in out
        assert ("layers=12, d_model=768" if scale == "paper" else "layers=4, d_model=64") in out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))

    # an invalid variant shows up in the dry run (config dataclasses only), and the exit code says so
    grid = write_grid(tmp_path, {"name": "broken", "extends": "smoke",
                                 "variants": {"bad_topk": {"model.block.memory.topk": 1000},
                                              "bad_path": {"model.block.memory.topkk": 4},
                                              "bad_steps": {"trainer.max_steps": 15}}})
    code = main(["ablate", str(grid), "--dry-run", "--runs-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 1
    assert "INVALID bad_topk" in out and "memory.topk=1000 must be <=" in out
    assert "INVALID bad_steps" in out and "multiple of trainer.val_check_interval" in out
    assert "INVALID bad_path" in out and "unknown option model.block.memory.topkk; allowed under model.block.memory" in out
    specs = resolve_runs(load_grid(str(grid)), tmp_path / "runs")
    assert sum(s.error is not None for s in specs) == 3


# --------------------------------------------------------------------------- the runner, end to end


def test_niah_tables_average_seeds_and_list_each_seed():
    from ablations.report import niah_markdown

    def row(variant, seed, exact, digits, status="FINISHED"):
        return {"variant": variant, "seed": seed, "status": status,
                "cells": {("exact", 256, 0): exact, ("digit_acc", 256, 0): digits}}

    rows = [row("fwpkm", 1, 0.5, 0.75), row("fwpkm", 0, 0.25, 0.25), row("swa", 0, 0.0, 0.1),
            row("swa", 1, 0.9, 0.9, status="FAILED")]
    text = niah_markdown(rows, order=["swa", "fwpkm"])
    lines = text.splitlines()
    assert "| swa | 0 | 0.00 / 0.10 |" in lines  # the failed seed is left out, one seed: no std
    assert "| fwpkm | 0 | 0.38 ± 0.18 / 0.50 ± 0.35 |" in lines
    assert "| fwpkm | 0, 0 | 0.25 / 0.25 |" in lines and "| fwpkm | 1, 0 | 0.50 / 0.75 |" in lines
    assert lines.index("| swa | 0 | 0.00 / 0.10 |") < lines.index("| fwpkm | 0 | 0.38 ± 0.18 / 0.50 ± 0.35 |")
    assert niah_markdown([row("x", 0, 0.1, 0.1, status="FAILED")]) == ""

    # with question counts: the seeds' questions pooled (5 of 20 and 20 of 40), Wilson's interval
    counted = [row("fwpkm", 0, 0.25, 0.25), row("fwpkm", 1, 0.5, 0.75)]
    for r, n in zip(counted, (20, 40)):
        r["cells"][("questions", 256, 0)] = n
    lines = niah_markdown(counted).splitlines()
    assert "| fwpkm | 0 | 0.42 [0.30, 0.54] n=60 / 0.50 |" in lines
    assert "| fwpkm | 0, 0 | 0.25 [0.11, 0.47] n=20 / 0.25 |" in lines


def test_margin_tables_show_one_runs_interval_or_the_seeds_mean_and_t_interval():
    from ablations.report import margin_table

    def row(variant, seed, random_margin, other_margin, low=float("nan"), high=float("nan")):
        return {"variant": variant, "seed": seed, "status": "FINISHED",
                "cells": {("exact", 256, 2): 0.0, ("over_random", 256, 2): random_margin, ("over_random_low", 256, 2): low,
                          ("over_random_high", 256, 2): high, ("over_other", 256, 2): other_margin}}

    lines = margin_table([row("swa", 0, 0.0, -0.01, -0.05, 0.05), row("fwpkm", 0, 1.0, 0.5), row("fwpkm", 1, 2.0, 0.7)],
                         order=["swa", "fwpkm"]).splitlines()
    assert "| swa | 2 | +0.00 [-0.05, +0.05] / -0.01 |" in lines  # one run: its questions' interval
    half = 12.706 * (2 ** 0.5 / 2) / 2 ** 0.5  # two seeds: t with 1 degree of freedom, stdev 0.707
    assert f"| fwpkm | 2 | +1.50 [{1.5 - half:+.2f}, {1.5 + half:+.2f}] / +0.60 [{0.6 - 12.706 * 0.1:+.2f}, " \
           f"{0.6 + 12.706 * 0.1:+.2f}] |" in lines
    assert margin_table([{"variant": "x", "seed": 0, "status": "FINISHED", "cells": {("exact", 256, 0): 0.0}}]) == ""


def test_wilson_interval_matches_the_textbook_values():
    from lit.evaluation.stats import wilson_interval

    assert wilson_interval(5, 10)[1:] == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.0, 0.2775), abs=1e-4)  # not empty at 0 successes
    assert wilson_interval(10, 10) == pytest.approx((1.0, 0.7225, 1.0), abs=1e-4)
    assert wilson_interval(25, 60)[1:] == pytest.approx((0.3006, 0.5427), abs=1e-4)  # worked by hand
    narrow, wide = wilson_interval(50, 100), wilson_interval(5, 10)
    assert narrow[2] - narrow[1] < wide[2] - wide[1]


def test_gate_histories_are_read_per_memory_layer_and_plotted(tmp_path):
    from types import SimpleNamespace

    from ablations.report import gate_histories, plot_gates

    history = {"mem/L1/gate_mean": [(20, 0.4), (10, 0.5), (30, float("nan"))], "mem/L3/gate_mean": [(10, 0.9)]}
    client = SimpleNamespace(get_metric_history=lambda run_id, key: [
        SimpleNamespace(step=s, value=v) for s, v in history[key]])
    metrics = {"mem/L1/gate_mean": 0.4, "mem/L3/gate_mean": 0.9, "mem/L1/mem_loss": 1.0, "val/ppl": 3.0}
    gates = gate_histories(client, "run", metrics)
    assert gates == {1: [(10, 0.5), (20, 0.4)], 3: [(10, 0.9)]}  # sorted by step, non-finite dropped
    rows = [{"variant": "fwpkm", "seed": 0, "gates": gates}, {"variant": "swa", "seed": 0, "gates": {}}]
    assert plot_gates(rows, tmp_path / "g.png").is_file()
    assert plot_gates(rows[1:], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_variants_may_have_their_own_seeds_and_grids_check_their_niah_options(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"extends": "smoke", "name": "g", "seeds": [0, 1, 2],
                                    "variants": {"dot": {"seeds": [5], "model.block.memory.topk": 2}}}))
    grid = load_grid(str(path))
    seeds = {}
    for spec in resolve_runs(grid, tmp_path / "runs"):
        seeds.setdefault(spec.variant, []).append(spec.seed)
    assert seeds == {"base": [0, 1, 2], "lookahead0": [0, 1, 2], "no_memory": [0, 1, 2], "dot": [5]}
    assert {s.seed for s in resolve_runs(grid, tmp_path / "runs", seeds=[7])} == {7}  # --seeds: every variant
    assert grid.to_dict()["variants"]["dot"] == {"seeds": [5], "model": {"block": {"memory": {"topk": 2}}}}
    recall = load_grid("recall")
    assert recall.seeds == [0, 1, 2] and all(recall.variant_seeds[v] == [0, 1] for v in recall.variants
                                             if v not in ("fwpkm", "swa_only"))
    for niah, message in [({"families": ["nope"]}, "eval.niah.families='nope'"), ({"sample": 3}, "unexpected keyword"),
                          ({"iterations": [-1]}, "eval.niah.iterations")]:
        path.write_text(yaml.safe_dump({"extends": "smoke", "name": "g", "eval": {"niah": niah}}))
        with pytest.raises(GridError, match=re.escape(message)):
            load_grid(str(path))


def test_smoke_grid_end_to_end_with_failures_then_skips_finished_runs(tmp_path):
    grid_data = {
        "name": "smoke-e2e", "extends": "smoke",
        "variants": {
            "bad_config": {"model.block.memory.topk": 1000},  # caught before training
            "bad_runtime": {"trainer.precision": "not-a-precision"},  # fails inside `fwpkm train`
        }}
    grid = write_grid(tmp_path, grid_data)
    proc = run(tmp_path, "ablate", str(grid), "--workers", "2", expect=1)
    out = proc.stdout
    smoke_variants = list(load_grid("smoke").variants)
    variants = smoke_variants + ["bad_config", "bad_runtime"]

    # the summary table: printed, CSV and Markdown, one row per variant
    assert "| variant | seeds | val loss |" in out
    folder = tmp_path / "runs" / "ablations" / "smoke-e2e"
    import pandas as pd

    table = pd.read_csv(folder / "summary.csv")
    assert list(table["variant"]) == variants
    finished = table[table["variant"].isin(smoke_variants)]
    assert (finished["finished"] == 1).all() and finished["val_loss_mean"].notna().all()
    assert finished["niah_exact_mean"].notna().all() and (finished["params_mean"] > 0).all()
    assert finished["tokens_per_s_mean"].notna().all()
    assert finished.set_index("variant")["gate_mean_mean"].drop("no_memory").notna().all()
    reads = finished.set_index("variant")["effective_reads_mean"]  # FwPKM with top-4: 1 <= reads <= 4
    assert reads.drop("no_memory").between(1, 4).all() and pd.isna(reads["no_memory"])
    assert set(table[~table["variant"].isin(smoke_variants)]["status"]) == {"FAILED"}
    assert (folder / "summary.md").is_file() and (folder / "summary.png").is_file()
    assert finished["niah_digit_acc_mean"].between(0, 1).all()
    assert "NIAH exact match [95% Wilson interval] n=questions / digit accuracy of each seed" in out
    assert " n=" in out and (folder / "summary_niah.png").is_file()  # each cell with its number of questions
    assert (folder / "summary_gates.png").is_file()  # gate trajectories of the memory runs
    # eval.niah.families: a table and a plot per family, the spec's last; eval.ppl: loss by position
    assert out.index("### NIAH, needle family ledger") < out.index("### NIAH, needle family spec")
    assert (folder / "summary_niah_ledger.png").is_file() and (folder / "summary_niah_spec.png").is_file()
    assert "Streamed loss (nats/token) by token position" in out and "| 0-32 | 32-64 |" in out
    assert (folder / "summary_positions.png").is_file()

    # MLflow: one parent run for the grid, every run nested under it with its tags
    parents = runs_of(tmp_path, "tags.`fwpkm.role` = 'grid' and tags.`fwpkm.grid` = 'smoke-e2e'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = runs_of(tmp_path, f"tags.`fwpkm.parent_run` = '{parent.info.run_id}'")
    by_variant = {r.data.tags["fwpkm.variant"]: r for r in children}
    assert sorted(by_variant) == sorted(variants) and len(children) == len(variants)
    for name in smoke_variants:
        r = by_variant[name]
        assert r.info.status == "FINISHED" and r.data.tags["fwpkm.stage"] == "done"
        assert r.data.tags["fwpkm.grid"] == "smoke-e2e" and r.data.tags["fwpkm.seed"] == "0"
        assert len(r.data.tags["fwpkm.config_hash"]) == 12 and r.data.tags["variant"] == name
        assert "val/ppl" in r.data.metrics and "niah/exact" in r.data.metrics and "model/params" in r.data.metrics
        assert {"niah/digit_acc/L128/n0", "niah/digit_acc/L128/n1", "niah/exact/L128/n1"} <= set(r.data.metrics)
        assert r.data.metrics["niah/questions/Fledger/L128/n1"] == 1 and "niah/exact/Fspec/L128/n0" in r.data.metrics
        assert {"ppl/loss/P0", "ppl/loss/P32", "ppl/loss/P128"} <= set(r.data.metrics)
        assert r.data.metrics["ppl/tokens/P128"] == 128 * r.data.metrics["ppl/streams"]  # positions 128-255
    assert by_variant["bad_config"].info.status == "FAILED"
    assert "topk=1000" in by_variant["bad_config"].data.tags["fwpkm.error"]
    assert by_variant["bad_runtime"].info.status == "FAILED"
    assert "not-a-precision" in by_variant["bad_runtime"].data.tags["fwpkm.error"]
    c = client(tmp_path)
    artifacts = {a.path for a in c.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/summary.csv", "summary/summary.md", "summary/summary.png"} <= artifacts

    # the same command again: finished runs are skipped, failed ones tried (and recorded) again
    proc = run(tmp_path, "ablate", str(grid), "--workers", "2", expect=1)
    for name in smoke_variants:
        assert f"skip smoke-e2e/{name}/seed0" in proc.stdout
    children = runs_of(tmp_path, f"tags.`fwpkm.parent_run` = '{parent.info.run_id}'")
    assert len(children) == len(variants)  # no new runs: skipped ones and the failed ones reused
    assert all((folder / v / "seed0" / "train.log").read_text().count("=====") == 1 for v in smoke_variants)

    # another eval config: the trained runs are evaluated again, not trained again
    niah = {**load_grid("smoke").eval["niah"], "samples_per_cell": 2, "n_needles": 1}
    write_grid(tmp_path, {**grid_data, "eval": {"niah": niah}})
    proc = run(tmp_path, "ablate", str(grid), "--workers", "2", expect=1)
    for name in smoke_variants:
        assert f"re-evaluate smoke-e2e/{name}/seed0" in proc.stdout
        assert (folder / name / "seed0" / "train.log").read_text().count("=====") == 1
        assert len(pd.read_csv(folder / name / "seed0" / "niah.csv")) == 2 * 2 * 2  # 2 families x 2 passes x 2 samples
    assert len(runs_of(tmp_path, f"tags.`fwpkm.parent_run` = '{parent.info.run_id}'")) == len(variants)

    # the report rebuilds the same table from the MLflow store alone
    import shutil

    shutil.rmtree(folder)
    proc = run(tmp_path, "report", "smoke-e2e", "--out", str(tmp_path / "report"))
    rebuilt = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert list(rebuilt["variant"]) == variants
    pd.testing.assert_series_equal(rebuilt["val_loss_mean"], table["val_loss_mean"])
    assert (tmp_path / "report" / "summary.png").is_file()


def test_killed_runner_resumes_the_interrupted_run(tmp_path):
    import torch

    args = ["ablate", "smoke", "--only", "base", "--set", "trainer.max_steps=40", "--set",
            "trainer.val_check_interval=40", "--set", "checkpoint.every_n_steps=4"]
    (tmp_path / "store").mkdir()
    proc = subprocess.Popen(fwpkm(tmp_path, *args), cwd=tmp_path, env=env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_dir = tmp_path / "runs" / "ablations" / "smoke" / "base" / "seed0"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + TIMEOUT
    step = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.is_file():
                try:
                    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
                except Exception:  # being written
                    step = 0
                if step >= 8:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, f"the runner ended before it could be killed:\n{proc.communicate()[0][-4000:]}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its `fwpkm train` child
        proc.communicate()
    assert 8 <= step < 40
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert client(tmp_path).get_run(run_id).info.status == "RUNNING"

    done = run(tmp_path, *args)
    assert "done smoke/base/seed0" in done.stdout
    assert (run_dir / "mlflow_run_id").read_text().strip() == run_id  # the same MLflow run
    r = client(tmp_path).get_run(run_id)
    assert r.info.status == "FINISHED" and r.data.tags["fwpkm.stage"] == "done"
    assert int(r.data.tags["fwpkm.started_at_step"]) >= 8  # resumed from the checkpoint, not from step 0
    assert "Restored all states from the checkpoint" in (run_dir / "train.log").read_text()
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 40
    losses = client(tmp_path).get_metric_history(run_id, "train/loss")
    # Lightning writes a step's checkpoint just before it hands that step's metrics to the logger;
    # a kill inside that window loses the metrics of the step before the resumed one (a known limit).
    resumed = int(r.data.tags["fwpkm.started_at_step"])
    assert set(range(40)) - {m.step for m in losses} <= {resumed - 1}


# --------------------------------------------------------------------------- Optuna


def study_trials(tmp_path: Path, name: str):
    import optuna

    storage = f"sqlite:///{tmp_path / 'runs' / 'tune' / 'optuna.db'}"
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def test_tune_study_with_pruning_completes_then_resumes_with_more_trials(tmp_path):
    from optuna.trial import TrialState

    proc = run(tmp_path, "tune", "smoke", "--n-trials", "3", "--seed", "0")
    assert "best trial" in proc.stdout
    first = study_trials(tmp_path, "smoke-addr_loss")
    assert [t.number for t in first] == [0, 1, 2]
    assert {t.state for t in first} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert sum(t.state == TrialState.COMPLETE for t in first) >= 2  # the pruner's 2 startup trials
    assert all(t.intermediate_values for t in first)  # the Lightning callback reported val losses
    assert all(1e-3 <= t.params["model.block.memory.addr_loss_weight"] <= 10 for t in first)

    parents = runs_of(tmp_path, "tags.`fwpkm.role` = 'study' and tags.`fwpkm.study` = 'smoke-addr_loss'")
    assert len(parents) == 1
    parent = client(tmp_path).get_run(parents[0].info.run_id)
    assert parent.info.status == "FINISHED" and "best_value" in parent.data.metrics
    assert "best.model.block.memory.addr_loss_weight" in parent.data.tags
    artifacts = [a.path for a in client(tmp_path).list_artifacts(parent.info.run_id, "report")]
    assert {"report/optimization_history.png", "report/param_importances.png", "report/summary.md"} <= set(artifacts)
    assert not client(tmp_path).list_artifacts(parent.info.run_id, "optuna")  # each plot written and logged once
    assert not (tmp_path / "runs" / "tune" / "smoke-addr_loss" / "optuna").exists()
    trials = runs_of(tmp_path, f"tags.`fwpkm.parent_run` = '{parent.info.run_id}'")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in trials) == [0, 1, 2]
    for r in trials:
        assert r.data.tags["optuna.state"] in ("COMPLETE", "PRUNED")
        if r.data.tags["optuna.state"] == "COMPLETE":
            assert "optuna/value" in r.data.metrics

    # the same study from its storage, with a larger total: one more trial, the first three untouched
    run(tmp_path, "tune", "smoke", "--n-trials", "4", "--seed", "0")
    second = study_trials(tmp_path, "smoke-addr_loss")
    assert [t.number for t in second] == [0, 1, 2, 3]
    assert [(t.params, t.state, t.value) for t in second[:3]] == [(t.params, t.state, t.value) for t in first]
    assert second[3].params not in [t.params for t in first]  # a resumed sampler does not replay its samples
    assert second[3].state in (TrialState.COMPLETE, TrialState.PRUNED)

    proc = run(tmp_path, "report", "smoke-addr_loss", "--out", str(tmp_path / "report"))
    import pandas as pd

    table = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert list(table["trial"]) == [0, 1, 2, 3] and table["best"].sum() == 1
    assert (tmp_path / "report" / "optimization_history.png").is_file()


def test_two_objective_study_has_its_disabled_point_a_front_and_trial_run_links(tmp_path):
    from optuna.trial import TrialState

    objectives = [{"metric": "mqar/acc/P16", "direction": "maximize"}, {"metric": "val_loss", "direction": "minimize"}]
    grid = write_grid(tmp_path, {"name": "mqar-micro", "extends": "mqar", "tune": {
        "study": "micro", "n_trials": 2, "seed": 0, "objectives": objectives, "pruner": {"type": "none"},
        "eval": {"mqar": {"pairs": [16], "samples": 2}},
        "overrides": {"trainer.max_steps": 4, "trainer.val_check_interval": 2, "checkpoint.every_n_steps": 2,
                      "data.batch_size": 2, "data.seq_len": 128, "data.mqar_pairs": [4, 8, 16],
                      "trainer.limit_val_batches": 1}}})
    proc = run(tmp_path, "tune", str(grid))
    assert "Pareto trial" in proc.stdout and "recommended trial" in proc.stdout
    trials = study_trials(tmp_path, "micro")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(len(t.values) == 2 and 0 <= t.values[0] <= 1 and t.values[1] > 0 for t in trials)
    weight = "model.block.memory.addr_loss_weight"
    disabled = [t for t in trials if t.user_attrs.get("disabled") == weight]
    assert len(disabled) == 1 and weight not in disabled[0].params  # the switched-off point, once
    memory = yaml.safe_load((tmp_path / "runs" / "tune" / "micro" / f"trial{disabled[0].number:04d}"
                             / "grid_config.yaml").read_text())["model"]["block"]["memory"]
    assert memory["addr_loss_weight"] is None and memory["grad_to_values_only"] is False
    assert all(1e-3 <= t.params[weight] <= 100 for t in trials if t is not disabled[0])

    for t in trials:  # each trial names its MLflow run, each run its trial and both objective values
        r = client(tmp_path).get_run(t.user_attrs["mlflow_run_id"])
        assert r.data.tags["optuna.trial_number"] == str(t.number)
        assert r.data.metrics["optuna/value/mqar/acc/P16"] == pytest.approx(t.values[0])
        assert r.data.metrics["optuna/value/val_loss"] == pytest.approx(t.values[1])
    folder = tmp_path / "runs" / "tune" / "micro"
    assert (folder / "pareto_front.png").is_file() and "Recommended trial" in (folder / "summary.md").read_text()

    run(tmp_path, "report", "micro", "--out", str(tmp_path / "report"), "--no-log")  # from MLflow alone
    import pandas as pd

    table = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert list(table["trial"]) == [0, 1] and table["best"].sum() == 1 and table["pareto"].sum() >= 1
    assert table.loc[table["best"], "pareto"].all()
    assert (tmp_path / "report" / "pareto_front.png").is_file()


def test_pareto_front_and_recommended_point():
    from ablations.report import pareto_mask, recommended_index

    points = [[0.9, 3.0], [0.5, 2.0], [0.4, 2.5], [0.7, 2.2], [0.9, 3.1]]  # (recall up, loss down)
    assert pareto_mask(points, ["maximize", "minimize"]) == [True, True, False, True, False]
    front = [points[i] for i in (0, 1, 3)]
    assert recommended_index(front, ["maximize", "minimize"]) == 2  # (0.7, 2.2): nearest the utopia corner
    assert recommended_index([[1.0, 1.0]], ["maximize", "minimize"]) == 0
    # a two-point front is always a tie when scaled over itself: the better first objective wins
    assert recommended_index([[0.5, 2.0], [0.9, 3.0]], ["maximize", "minimize"]) == 1


def test_study_definitions_fail_clearly():
    from ablations.tune import Setup, TuneError

    def setup(**tune):
        grid = {"name": "bad", "extends": "mqar", "tune": tune}
        path = write_grid(Path(pytest.importorskip("tempfile").mkdtemp()), grid)
        return Setup(str(path), None, None, None, "runs", None, None, None, None)

    two = [{"metric": "mqar/acc/P1024", "direction": "maximize"}, {"metric": "val_loss"}]
    with pytest.raises(TuneError, match="cannot prune"):
        setup(objectives=two, eval={"mqar": {}}, pruner={"type": "median"})
    with pytest.raises(TuneError, match="pruner sees the validation loss"):  # one objective, but not the loss
        setup(objectives=two[:1], eval={"mqar": {}}, pruner={"type": "median"})
    with pytest.raises(TuneError, match="tune.eval is empty"):
        setup(objectives=two, eval={})
    with pytest.raises(TuneError, match="direction='up'"):
        setup(objectives=[{"metric": "val_loss", "direction": "up"}])
    with pytest.raises(TuneError, match="`disabled:`"):
        setup(params={"model.block.memory.addr_loss_weight": {"low": 0.1, "high": 1, False: {"x": 1}}})
    with pytest.raises(TuneError, match="sampler.type='cmaes'"):
        setup(sampler={"type": "cmaes"}).sampler()


def test_two_tune_workers_share_one_study_without_lost_or_duplicated_trials(tmp_path):
    from optuna.trial import TrialState

    # every trial is pruned at its second report (step 4 of 6): the pruning path, deterministically
    grid = write_grid(tmp_path, {"name": "smoke-workers", "extends": "smoke",
                                 "tune": {"study": "workers", "pruner": {"type": "threshold", "upper": 1.0,
                                                                         "n_warmup_steps": 3}}})
    (tmp_path / "store").mkdir()
    procs = [subprocess.Popen(fwpkm(tmp_path, "tune", str(grid), "--n-trials", "4"), cwd=tmp_path, env=env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-6000:]
    assert all("[tune] trial" in out for out in outs), "both workers ran trials"

    trials = study_trials(tmp_path, "workers")
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.PRUNED for t in trials)
    assert all(sorted(t.intermediate_values) == [2, 4] for t in trials)
    parents = runs_of(tmp_path, "tags.`fwpkm.role` = 'study' and tags.`fwpkm.study` = 'workers'")
    assert len(parents) == 1
    runs = runs_of(tmp_path, f"tags.`fwpkm.parent_run` = '{parents[0].info.run_id}'")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == [0, 1, 2, 3]
    folder = tmp_path / "runs" / "tune" / "workers"
    for number in range(4):
        run_dir = folder / f"trial{number:04d}"
        assert (run_dir / "train.log").read_text().count("=====") == 1  # trained once
        import torch

        assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                          weights_only=True)["global_step"] == 4  # pruning stopped the training


def test_killed_tune_worker_leaves_a_trial_that_the_next_worker_resumes(tmp_path):
    import torch
    from optuna.trial import TrialState

    args = ["tune", "smoke", "--study-name", "killed", "--n-trials", "1", "--set", "trainer.max_steps=40",
            "--set", "trainer.val_check_interval=20", "--set", "checkpoint.every_n_steps=4", "--heartbeat", "1"]
    (tmp_path / "store").mkdir()
    proc = subprocess.Popen(fwpkm(tmp_path, *args), cwd=tmp_path, env=env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_dir = tmp_path / "runs" / "tune" / "killed" / "trial0000"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    deadline, step = time.time() + TIMEOUT, 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.is_file():
                try:
                    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
                except Exception:
                    step = 0
                if step >= 8:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-4000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert [t.state for t in study_trials(tmp_path, "killed")] == [TrialState.RUNNING]

    out = run(tmp_path, *args).stdout  # waits for the silent trial to go stale (3 heartbeats), then takes it
    assert "taking over trial 0 (its worker stopped) as trial 1" in out
    dead, trial = study_trials(tmp_path, "killed")  # Optuna failed the stale trial and enqueued it again
    assert dead.state == TrialState.FAIL and trial.system_attrs["failed_trial"] == 0
    assert trial.state == TrialState.COMPLETE and sorted(trial.intermediate_values) == [20, 40]
    assert trial.params == dead.params
    log = (run_dir / "train.log").read_text()
    assert log.count("=====") == 2 and "Restored all states from the checkpoint" in log
