"""The 3-seed tables of docs/recall.md (section "Three seeds") from this folder's CSVs:
``python docs/results/recall_v5_pilots/session_2026-12-03/tables.py``. Seed 0's files are the
pilots' (C3000: FwPKM, swa_only: SWA only); seeds 1 and 2 are named so. `fwpkm report pilotC` gives
the same per-family figures from a grid's MLflow store."""

import csv
from pathlib import Path

from lit.evaluation.stats import mean_interval, wilson_interval

HERE = Path(__file__).parent
MODELS = {"FwPKM": ("C3000", "fwpkm_seed1", "fwpkm_seed2"), "SWA only": ("swa_only", "swa_only_seed1", "swa_only_seed2")}
SAMPLES = {"FwPKM": "fwpkm_seed", "SWA only": "swa_only_seed"}
FAMILIES = ("held-out", "vault", "agent", "locker", "ledger", "spec", "train_like", "train_same")
LOOKUP = {"vault", "agent", "locker"}  # the held-out families asked in other words
LENGTHS = ("256", "2048")


def cells(kind: str, name: str) -> dict:
    return {(r["family"], r["context_len"], r["iterations"]): r for r in csv.DictReader(open(HERE / f"{kind}_{name}.csv"))}


def seeds_cell(values: list, signed: bool = False) -> str:
    mean, low, high = mean_interval(values, clip=not signed)
    f = "{:+.2f}" if signed else "{:.2f}"
    return f"{f.format(mean)} [{f.format(low)}, {f.format(high)}] (" + ", ".join(map(f.format, values)) + ")"


def niah_table(models: dict = MODELS, families: tuple = FAMILIES, prefix: str = "") -> None:
    print("| model | family | tokens | exact, seeds' mean [t 95%] (each seed) | pooled [Wilson] n | over_random (each seed) |"
          " over_other (each seed) |\n|---|---|---|---|---|---|---|")
    for model, names in models.items():
        summaries, margins = [cells(f"{prefix}niah", n) for n in names], [cells(f"{prefix}likelihood", n) for n in names]
        for family in families:
            for L in LENGTHS:
                key = (family, L, "2")
                exact = [float(s[key]["exact"]) for s in summaries]
                questions = [int(s[key]["questions"]) for s in summaries]
                p, low, high = wilson_interval(round(sum(e * q for e, q in zip(exact, questions))), sum(questions))
                name = f"**{family}**" if family == "held-out" else family
                print(f"| {model} ({len(names)} seeds) | {name} | {int(L):,} | {seeds_cell(exact)} | {p:.2f} [{low:.2f}, "
                      f"{high:.2f}] n={sum(questions)} | {seeds_cell([float(m[key]['over_random']) for m in margins], True)} | "
                      f"{seeds_cell([float(m[key]['over_other']) for m in margins], True)} |")


def lookup_table() -> None:
    print("\n| model | families | tokens | questions per seed | over_random | over_other |\n|---|---|---|---|---|---|")
    for model, prefix in SAMPLES.items():
        for L in LENGTHS:
            margins = {"random_value_nll": [], "other_needle_nll": []}
            counts = []
            for seed in range(3):
                rows = [r for r in csv.DictReader(open(HERE / "samples" / f"{prefix}{seed}.csv"))
                        if r["family"] in LOOKUP and r["context_len"] == L and r["iterations"] == "2"]
                counts.append(len(rows))
                for decoy, values in margins.items():
                    values.append(sum(float(r[decoy]) - float(r["answer_nll"]) for r in rows) / len(rows))
            print(f"| {model} (3 seeds) | vault+agent+locker | {int(L):,} | {'/'.join(map(str, counts))} | "
                  f"{seeds_cell(margins['random_value_nll'], True)} | {seeds_cell(margins['other_needle_nll'], True)} |")


def position_table() -> None:
    files = {"FwPKM": ("C3000", "fwpkm_seed1", "fwpkm_seed2"), "SWA only": ("swa_only", "swa_only_seed1", "swa_only_seed2")}
    tables = {m: [list(csv.DictReader(open(HERE / f"ppl_{n}.csv"))) for n in names] for m, names in files.items()}
    print("\n| positions | tokens | FwPKM, 3 seeds: mean [t 95%] (each seed) | SWA only, 3 seeds | FwPKM - SWA only, paired by "
          "seed [t 95%] |\n|---|---|---|---|---|")
    for i, bucket in enumerate(tables["FwPKM"][0]):
        fw, swa = ([float(t[i]["loss"]) for t in tables[m]] for m in ("FwPKM", "SWA only"))
        cell = lambda v: "%.3f [%.3f, %.3f] (%s)" % (*mean_interval(v, clip=False), ", ".join("%.3f" % x for x in v))
        gap = mean_interval([a - b for a, b in zip(fw, swa)], clip=False)
        print(f"| {int(bucket['start']):,}-{int(bucket['end']):,} | {int(bucket['tokens']):,} | {cell(fw)} | {cell(swa)} | "
              "%+.3f [%+.3f, %+.3f] |" % gap)


if __name__ == "__main__":
    niah_table()
    lookup_table()
    position_table()
    print("\nFamilies written after the results (../fresh_families.yaml):\n")
    niah_table({m: tuple(f"{p}{s}" for s in range(3)) for m, p in SAMPLES.items()}, ("shipment", "oven"), "fresh_")
