"""The paper's ablation claims on pilot C's mixture, and how far the answer's query is from the needle's, from
the CSVs of this folder and of ``../session_2026-12-03`` (pilot C's published FwPKM, SWA-only and FwMLP runs):
``python docs/results/recall_v5_pilots/session_2026-12-07/tables.py``.

NIAH: 2 needles, 50 questions per (family, length, passes) and seed; exact match as the seeds' mean [t 95%]
(each seed) and the pooled questions [Wilson 95%]; likelihood margins in nats per answer token, the seeds'
means [t 95%] (each seed). Loss by position: the streamed loss on held-out plain text (``ppl_*.csv``)."""

import csv
import importlib.util
from pathlib import Path

from lit.evaluation.stats import mean_interval, wilson_interval

HERE = Path(__file__).parent
C_DIR = HERE.parent / "session_2026-12-03"
_spec = importlib.util.spec_from_file_location("tables_2026_12_06", HERE.parent / "session_2026-12-06" / "tables.py")
_earlier = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_earlier)
seeds_cell = _earlier.seeds_cell  # rates and margins: "mean [t 95%] (each seed)"


def value_cell(values: list, digits: int = 3) -> str:
    """Perplexities and losses: the seeds' mean [t 95%, not clipped] (each seed)."""
    f = f"{{:.{digits}f}}"
    if len(values) < 2:
        return f.format(values[0]) + " (one seed)" if values else "-"
    mean, low, high = mean_interval(values, clip=False)
    return f"{f.format(mean)} [{f.format(low)}, {f.format(high)}] (" + ", ".join(map(f.format, values)) + ")"

# model -> per seed: (folder, summary stems (niah_/likelihood_<stem>.csv, fresh_ ones included), ppl stem)
MODELS = {
    "FwPKM": [(C_DIR, ("C3000", "fwpkm_seed0"), "C3000"), (C_DIR, ("fwpkm_seed1",), "fwpkm_seed1"),
              (C_DIR, ("fwpkm_seed2",), "fwpkm_seed2")],
    "SWA only": [(C_DIR, ("swa_only", "swa_only_seed0"), "swa_only"), (C_DIR, ("swa_only_seed1",), "swa_only_seed1"),
                 (C_DIR, ("swa_only_seed2",), "swa_only_seed2")],
    "FwMLP": [(C_DIR, ("fwmlp",), "fwmlp"), (HERE, ("fwmlp_seed1",), "fwmlp_seed1")],
} | {name: [(HERE, (f"{variant}_seed{s}",), f"{variant}_seed{s}") for s in (0, 1)]
     for name, variant in (("lookahead 0", "fwpkm_lookahead0"), ("dot scoring", "fwpkm_dot"),
                           ("no addressing loss", "fwpkm_no_addr"), ("J: train_topk 32", "J_fwpkm"))}
# final validation perplexity per seed: pilot C's from docs/recall.md ("Three seeds"; those runs were trained on
# another host and are not in this folder), the others from val_claims.csv (each run's last validation, read from MLflow)
PUBLISHED_PPL = {"FwPKM": [3.426, 3.422, 3.366], "SWA only": [3.550, 3.545, 3.557], "FwMLP": [3.56]}
FAMILIES = ("spec", "oven", "ledger", "held-out")
LENGTHS = ("256", "2048")


def rows_of(folder: Path, kind: str, stems: tuple) -> dict:
    """{(family, length, passes): row} of a model seed's summaries (main and fresh families' files)."""
    out = {}
    for stem in stems:
        for prefix in ("", "fresh_"):
            path = folder / f"{prefix}{kind}_{stem}.csv"
            if path.exists():
                out.update({(r["family"], r["context_len"], r["iterations"]): r for r in csv.DictReader(open(path))})
    return out


def available(model: str) -> list:
    return [run for run in MODELS[model] if rows_of(run[0], "niah", run[1])]


def val_ppl(model: str) -> list:
    variant = MODELS[model][-1][1][0].rsplit("_seed", 1)[0]
    path = HERE / "val_claims.csv"
    here = [float(r["val_ppl"]) for r in csv.DictReader(open(path)) if r["variant"] == variant] if path.exists() else []
    return PUBLISHED_PPL.get(model, []) + here


def pass_table(models=("C seed 1 (AMD rerun)", "dot scoring", "no addressing loss", "J: train_topk 32"),
               families=("spec", "oven")) -> None:
    """Exact match with 0, 1 and 2 passes, pooled over the seeds' questions [Wilson]; pass 1 from pass1_niah_*.csv."""
    runs_of = {"C seed 1 (AMD rerun)": [(HERE.parent / "session_2026-12-06", ("C_rerun_amd_fwpkm_seed1",), None)]}
    print("\n| model | family | tokens | 0 passes | 1 pass | 2 passes |\n|---|---|---|---|---|---|")
    for model in models:
        runs = runs_of.get(model) or MODELS[model]
        stems = [(d, st) for d, st, _ in runs]  # pass 1 was run this session, for every model, into HERE
        once = [rows_of(HERE, "pass1_niah", st) for _, st in stems]
        for family in families:
            for L in LENGTHS:
                cells = [pooled(runs, (family, L, "0"))]
                one = [o[(family, L, "1")] for o in once if (family, L, "1") in o]
                if len(one) == len(once) and one:
                    hits = sum(round(float(r["exact"]) * int(r["questions"])) for r in one)
                    n = sum(int(r["questions"]) for r in one)
                    p, low, high = wilson_interval(hits, n)
                    cells.append(f"{p:.2f} [{low:.2f}, {high:.2f}] n={n}")
                else:
                    cells.append("-")
                cells.append(pooled(runs, (family, L, "2")))
                print(f"| {model} | {family} | {int(L):,} | " + " | ".join(cells) + " |")


def niah_table(passes: str = "2") -> None:
    print(f"| model | val ppl (each seed) | family | tokens | exact, seeds' mean [t 95%] (each seed) | pooled [Wilson] n |"
          f" over_random (each seed) | over_other (each seed) |\n|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        runs = available(model)
        if not runs:
            continue
        summaries = [rows_of(d, "niah", s) for d, s, _ in runs]
        margins = [rows_of(d, "likelihood", s) for d, s, _ in runs]
        for family in FAMILIES:
            for L in LENGTHS:
                key = (family, L, passes)
                if not all(key in s for s in summaries):
                    continue
                exact = [float(s[key]["exact"]) for s in summaries]
                questions = [int(s[key]["questions"]) for s in summaries]
                p, low, high = wilson_interval(round(sum(e * q for e, q in zip(exact, questions))), sum(questions))
                margin = lambda m: seeds_cell([float(x[key][m]) for x in margins if key in x], True)
                print(f"| {model} ({len(runs)}) | {value_cell(val_ppl(model))} | {family} | {int(L):,} | {seeds_cell(exact)} |"
                      f" {p:.2f} [{low:.2f}, {high:.2f}] n={sum(questions)} | {margin('over_random')} | {margin('over_other')} |")


def pooled(runs: list, key: tuple) -> str:
    """Exact match of all seeds' questions pooled [Wilson 95%] n, and each seed's."""
    summaries = [rows_of(d, "niah", stems) for d, stems, _ in runs]
    if not all(key in x for x in summaries):
        return "-"
    exact = [float(x[key]["exact"]) for x in summaries]
    questions = [int(x[key]["questions"]) for x in summaries]
    p, low, high = wilson_interval(round(sum(e * q for e, q in zip(exact, questions))), sum(questions))
    return f"{p:.2f} [{low:.2f}, {high:.2f}] n={sum(questions)} (" + ", ".join(f"{e:.2f}" for e in exact) + ")"


def claims_table() -> None:
    """One row per model: val ppl, the restated families' exact match (2 passes), the held-out ones' margin over a
    random value at 256 tokens, and the streamed loss at 2,048-4,096 positions."""
    print("| model | seeds | val ppl [t 95%] (each seed) | spec, 256 | spec, 2,048 | oven, 256 | oven, 2,048 |"
          " held-out, 256: over_random | loss at 2,048-4,096 |\n|---|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        runs = available(model)
        margins = [rows_of(d, "likelihood", stems) for d, stems, _ in runs]
        key = ("held-out", "256", "2")
        over = seeds_cell([float(m[key]["over_random"]) for m in margins if key in m], True)
        losses = []
        for folder, _, stem in runs:
            path = folder / f"ppl_{stem}.csv"
            if path.exists():
                losses += [float(r["loss"]) for r in csv.DictReader(open(path)) if (r["start"], r["end"]) == ("2048", "4096")]
        cells = [pooled(runs, (f, L, "2")) for f in ("spec", "oven") for L in LENGTHS]
        print(f"| {model} | {len(runs)} | {value_cell(val_ppl(model))} | " + " | ".join(cells) +
              f" | {over} | {value_cell(losses)} |")


def position_table(buckets=((2048, 4096), (4096, 8192))) -> None:
    """Each model's streamed loss in the buckets beyond the window, and its difference from FwPKM's mean."""
    def loss(folder, stem, bucket):
        path = folder / f"ppl_{stem}.csv"
        rows = {(int(r["start"]), int(r["end"])): float(r["loss"]) for r in csv.DictReader(open(path))} if path.exists() else {}
        return rows.get(bucket)
    print("\n| model | " + " | ".join(f"loss {a:,}-{b:,} (each seed)" for a, b in buckets) + " |\n|---|" + "---|" * len(buckets))
    for model in MODELS:
        cells = []
        for bucket in buckets:
            values = [v for v in (loss(d, p, bucket) for d, _, p in MODELS[model]) if v is not None]
            cells.append(value_cell(values))
        if any(c != "-" for c in cells):
            print(f"| {model} | " + " | ".join(cells) + " |")


def reach_table(stems: dict) -> None:
    """``fwpkm eval inspect --needle`` (binding_<stem>.csv): per family and memory layer, the median rank of the asked
    and the other needle's best value slot in the answer's read (0 = best; read if < 8 of 262,144), the share of
    questions whose asked rank is below 1,024, and the mean cosine of the answer's and the pair's queries."""
    print("\n| model | family | layer | n | asked rank, median | other rank, median | asked rank < 1,024 |"
          " cos(answer, asked pair) | cos(answer, other pair) |\n|---|---|---|---|---|---|---|---|---|")
    for model, (folder, stem) in stems.items():
        path = folder / f"binding_{stem}.csv"
        if not path.exists() or "asked_rank_median" not in open(path).readline():
            continue
        for r in csv.DictReader(open(path)):
            cos = lambda m: "%.2f [%.2f, %.2f]" % (float(r[m]), float(r[m + "_low"]), float(r[m + "_high"]))
            print(f"| {model} | {r['family']} | {r['layer']} | {r['questions']} | {float(r['asked_rank_median']):,.0f} |"
                  f" {float(r['other_rank_median']):,.0f} | {float(r['asked_rank_below_1024']):.2f} | {cos('asked_cos')} |"
                  f" {cos('other_cos')} |")


REACH = {f"H seed {s}": (HERE, f"H_fwpkm_seed{s}") for s in range(3)} | {
    "C seed 1 (AMD rerun)": (HERE, "C_rerun_amd_fwpkm_seed1")} | {
    f"{name} seed {s}": (HERE, f"{variant}_seed{s}") for name, variant in
    (("lookahead 0", "fwpkm_lookahead0"), ("dot", "fwpkm_dot"), ("no addr", "fwpkm_no_addr"), ("J", "J_fwpkm"))
    for s in (0, 1)}

if __name__ == "__main__":
    claims_table()
    print()
    niah_table("2")
    print("\n0 passes (chunk = input: the question is read before anything is written):\n")
    niah_table("0")
    pass_table()
    position_table()
    reach_table(REACH)
