"""Pilots K (memory at layer 3 only), L (loss weight 10 on fact recalls' values) and M (L's weight on pilot H's
shared-form facts), beside pilots C and H, from the CSVs of this folder and of the earlier sessions' folders:
``python docs/results/recall_v5_pilots/session_2026-12-07b/tables.py``.

NIAH: 2 needles, 2 passes, 50 questions per (family, length) and seed; exact match pooled over the seeds'
questions [Wilson 95%] n (each seed); likelihood margins in nats per answer token, the seeds' mean [t 95%]
(each seed). Binding (``fwpkm eval inspect --needle``): the share of the answer's read weight on the asked
needle's value slots minus the other needle's, per seed (50 questions each)."""

import csv
import importlib.util
from pathlib import Path

HERE = Path(__file__).parent
PILOTS = HERE.parent
_spec = importlib.util.spec_from_file_location("tables_2026_12_07", PILOTS / "session_2026-12-07" / "tables.py")
_earlier = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_earlier)
rows_of, pooled, seeds_cell, value_cell = _earlier.rows_of, _earlier.pooled, _earlier.seeds_cell, _earlier.value_cell

C_DIR, H_DIR = PILOTS / "session_2026-12-03", PILOTS / "session_2026-12-06"
# model -> per seed: (folder, summary stems, ppl stem); C's and H's as published in docs/recall.md
MODELS = {
    "C": [(C_DIR, ("C3000", "fwpkm_seed0"), "C3000"), (C_DIR, ("fwpkm_seed1",), "fwpkm_seed1"),
          (C_DIR, ("fwpkm_seed2",), "fwpkm_seed2")],
    "H": [(H_DIR, (f"H_fwpkm_seed{s}",), f"H_fwpkm_seed{s}") for s in range(3)],
} | {p: [(HERE, (f"{p}_fwpkm_seed{s}",), f"{p}_fwpkm_seed{s}") for s in (0, 1)] for p in "KLM"}
PUBLISHED_PPL = {"C": [3.426, 3.422, 3.366], "H": [3.425, 3.510, 3.384]}
BINDING_DIRS = {"C (AMD rerun)": [(H_DIR, "C_rerun_amd_fwpkm_seed1")], "H": [(H_DIR, f"H_fwpkm_seed{s}") for s in range(3)]} | {
    p: [(HERE, f"{p}_fwpkm_seed{s}") for s in (0, 1)] for p in "KLM"}
LENGTHS = ("256", "2048")


def available(model: str) -> list:
    return [run for run in MODELS[model] if rows_of(run[0], "niah", run[1])]


def val_ppl(model: str) -> list:
    path = HERE / "val_pilots.csv"
    here = [float(r["val_ppl"]) for r in csv.DictReader(open(path)) if r["pilot"] == f"pilot{model}"] if path.exists() else []
    return PUBLISHED_PPL.get(model, []) + here


def margin(runs: list, key: tuple, name: str) -> str:
    values = [float(m[key][name]) for m in (rows_of(d, "likelihood", s) for d, s, _ in runs) if key in m]
    return seeds_cell(values, True) if values else "-"


def headline_table() -> None:
    print("| model | seeds | val ppl (each seed) | held-out exact, 256 | held-out exact, 2,048 | held-out over_random, 256 |"
          " held-out over_other, 256 | held-out over_other, 2,048 | spec, 256 | oven, 2,048 |\n|---|---|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        runs = available(model)
        if not runs:
            continue
        cells = [pooled(runs, ("held-out", L, "2")) for L in LENGTHS]
        cells += [margin(runs, ("held-out", "256", "2"), "over_random")]
        cells += [margin(runs, ("held-out", L, "2"), "over_other") for L in LENGTHS]
        cells += [pooled(runs, ("spec", "256", "2")), pooled(runs, ("oven", "2048", "2"))]
        print(f"| {model} | {len(runs)} | {value_cell(val_ppl(model))} | " + " | ".join(cells) + " |")


def other_exact(runs: list, key: tuple) -> str:
    """The share of answers that are the other needle's value, pooled over the seeds (files that have it)."""
    rows = [rows_of(d, "niah", s).get(key) for d, s, _ in runs]
    if not all(r and r.get("other_exact") not in (None, "", "nan") for r in rows):
        return "-"
    n = sum(int(r["questions"]) for r in rows)
    return f"{sum(float(r['other_exact']) * int(r['questions']) for r in rows) / n:.2f}"


def family_table(families=("held-out", "vault", "agent", "locker", "ledger", "shipment", "spec", "oven")) -> None:
    print("\n| model | family | exact, 256 | exact, 2,048 | other needle's value, 256 / 2,048 | over_other, 256 |"
          " over_other, 2,048 |\n|---|---|---|---|---|---|---|")
    for model in MODELS:
        runs = available(model)
        for family in families if runs else ():
            cells = [pooled(runs, (family, L, "2")) for L in LENGTHS]
            cells += [" / ".join(other_exact(runs, (family, L, "2")) for L in LENGTHS)]
            cells += [margin(runs, (family, L, "2"), "over_other") for L in LENGTHS]
            print(f"| {model} | {family} | " + " | ".join(cells) + " |")


def binding_table(families=("spec", "oven", "ledger", "train_same", "train_like", "vault", "locker", "agent", "shipment")) -> None:
    """Per family: asked - other share of the answer's read, layer 1 / layer 3, each seed; and layer 3's median rank
    of the asked needle's slot (0 = best of 262,144; read if < 8)."""
    print("\n| model | seed | " + " | ".join(families) + " |\n|---|---|" + "---|" * len(families))
    for model, seeds in BINDING_DIRS.items():
        for folder, stem in seeds:
            path = folder / f"binding_{stem}.csv"
            if not path.exists():
                continue
            rows = {(r["family"], r["layer"]): r for r in csv.DictReader(open(path))}
            cells = []
            for family in families:
                diff = [f"{float(rows[(family, l)]['asked_minus_other']):+.2f}" if (family, l) in rows else "-" for l in "13"]
                rank = rows.get((family, "3"), {}).get("asked_rank_median")
                cells.append(" / ".join(diff) + (f" (r {float(rank):,.0f})" if rank else ""))
            print(f"| {model} | {stem.rsplit('seed', 1)[1]} | " + " | ".join(cells) + " |")


def position_table(bucket=("2048", "4096")) -> None:
    print("\n| model | loss at 2,048-4,096 (each seed) |\n|---|---|")
    for model, runs in MODELS.items():
        values = [float(r["loss"]) for d, _, stem in runs if (d / f"ppl_{stem}.csv").exists()
                  for r in csv.DictReader(open(d / f"ppl_{stem}.csv")) if (r["start"], r["end"]) == bucket]
        if values:
            print(f"| {model} | {value_cell(values)} |")


if __name__ == "__main__":
    headline_table()
    family_table()
    binding_table()
    position_table()
