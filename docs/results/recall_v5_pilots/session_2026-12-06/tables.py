"""Pilot H (shared-form fact rows) against pilot C, 3 seeds each, from the CSVs of this folder and of
``../session_2026-12-03`` (pilot C's published files): ``python docs/results/recall_v5_pilots/session_2026-12-06/tables.py``.
Every (family, length) is 2 passes, 50 questions per seed; exact match: the seeds' mean [t 95%] (each seed)
and the pooled questions [Wilson 95%]; margins: nats per answer token, the seeds' means [t 95%] (each seed)."""

import csv
import sys
from pathlib import Path

from lit.evaluation.stats import mean_interval, wilson_interval

HERE = Path(__file__).parent
C_DIR = HERE.parent / "session_2026-12-03"
# (folder, file stem per seed) of each model's summaries; samples/<stem>.csv holds every question
MODELS = {
    "C, FwPKM": [(C_DIR, "C3000", "fwpkm_seed0"), (C_DIR, "fwpkm_seed1", "fwpkm_seed1"), (C_DIR, "fwpkm_seed2", "fwpkm_seed2")],
    "H, FwPKM": [(HERE, f"H_fwpkm_seed{s}", f"H_fwpkm_seed{s}") for s in range(3)],
    "C, SWA only": [(C_DIR, "swa_only", "swa_only_seed0"), (C_DIR, "swa_only_seed1", "swa_only_seed1"),
                    (C_DIR, "swa_only_seed2", "swa_only_seed2")],
    "H, SWA only": [(HERE, f"H_swa_only_seed{s}", f"H_swa_only_seed{s}") for s in range(3)],
    "I, FwPKM": [(HERE, "I_fwpkm_seed0", "I_fwpkm_seed0")],
}
FAMILIES = ("held-out", "vault", "agent", "locker", "ledger", "spec", "train_like", "train_same", "shipment", "oven")
LOOKUP = {"vault", "agent", "locker"}  # the held-out families asked in other words (C's samples: these, not shipment)
LENGTHS = ("256", "2048")


def available(model: str) -> list:
    return [(d, summary, samples) for d, summary, samples in MODELS[model] if (d / f"niah_{summary}.csv").exists()]


def rows_of(folder: Path, kind: str, stem: str) -> dict:
    """{(family, length, passes): row} of a summary; the fresh families of 2026-12-03 came in separate files."""
    out = {}
    for prefix in ("", "fresh_"):
        path = folder / f"{prefix}{kind}_{stem}.csv"
        if path.exists():
            out.update({(r["family"], r["context_len"], r["iterations"]): r for r in csv.DictReader(open(path))})
    return out


def seeds_cell(values: list, signed: bool = False) -> str:
    if not values:
        return "-"
    f = "{:+.2f}" if signed else "{:.2f}"
    if len(values) == 1:
        return f.format(values[0]) + " (one seed)"
    mean, low, high = mean_interval(values, clip=not signed)
    return f"{f.format(mean)} [{f.format(low)}, {f.format(high)}] (" + ", ".join(map(f.format, values)) + ")"


def niah_table(models=("C, FwPKM", "H, FwPKM", "I, FwPKM", "C, SWA only", "H, SWA only"), families=FAMILIES) -> None:
    print("| model | family | tokens | exact, seeds' mean [t 95%] (each seed) | pooled [Wilson] n | over_random (each seed) |"
          " over_other (each seed) |\n|---|---|---|---|---|---|---|")
    for model in models:
        runs = available(model)
        if not runs:
            continue
        summaries = [rows_of(d, "niah", s) for d, s, _ in runs]
        margins = [rows_of(d, "likelihood", s) for d, s, _ in runs]
        for family in families:
            for L in LENGTHS:
                key = (family, L, "2")
                if not all(key in s for s in summaries):
                    continue
                exact = [float(s[key]["exact"]) for s in summaries]
                questions = [int(s[key]["questions"]) for s in summaries]
                p, low, high = wilson_interval(round(sum(e * q for e, q in zip(exact, questions))), sum(questions))
                name = f"**{family}**" if family == "held-out" else family
                print(f"| {model} ({len(runs)} seeds) | {name} | {int(L):,} | {seeds_cell(exact)} | {p:.2f} [{low:.2f}, "
                      f"{high:.2f}] n={sum(questions)} | {seeds_cell([float(m[key]['over_random']) for m in margins], True)} | "
                      f"{seeds_cell([float(m[key]['over_other']) for m in margins], True)} |")


def lookup_table(models=("C, FwPKM", "H, FwPKM", "I, FwPKM", "C, SWA only", "H, SWA only")) -> None:
    """The families asked in other words pooled: each seed's mean margin over its questions, then the seeds'."""
    print("\n| model | families | tokens | questions per seed | exact, pooled [Wilson] | over_random | over_other |"
          "\n|---|---|---|---|---|---|---|")
    for model in models:
        runs = available(model)
        if not runs:
            continue
        for L in LENGTHS:
            margins = {"random_value_nll": [], "other_needle_nll": []}
            counts, hits = [], 0
            for folder, _, stem in runs:
                rows = [r for r in csv.DictReader(open(folder / "samples" / f"{stem}.csv"))
                        if r["family"] in LOOKUP and r["context_len"] == L and r["iterations"] == "2"]
                counts.append(len(rows))
                hits += sum(float(r["exact"]) for r in rows)
                for decoy, values in margins.items():
                    values.append(sum(float(r[decoy]) - float(r["answer_nll"]) for r in rows) / len(rows))
            p, low, high = wilson_interval(round(hits), sum(counts))
            print(f"| {model} ({len(runs)} seeds) | {'+'.join(sorted(LOOKUP))} | {int(L):,} | {'/'.join(map(str, counts))} | "
                  f"{p:.2f} [{low:.2f}, {high:.2f}] n={sum(counts)} | {seeds_cell(margins['random_value_nll'], True)} | "
                  f"{seeds_cell(margins['other_needle_nll'], True)} |")


def binding_table(models=(("H, seed 0", "H_fwpkm_seed0"), ("H, seed 1", "H_fwpkm_seed1"), ("H, seed 2", "H_fwpkm_seed2"), ("I, seed 0", "I_fwpkm_seed0"))) -> None:
    """``fwpkm eval inspect --needle``: the share of the answer's read weight on the asked / the other needle's
    value slots, per family and layer (mean over the questions [t 95%])."""
    print("\n| model | family | n | layer 1: on asked | layer 1: on other | layer 3: on asked | layer 3: on other |"
          " layer 3: asked - other |\n|---|---|---|---|---|---|---|---|")
    for model, stem in models:
        path = HERE / f"binding_{stem}.csv"
        if not path.exists():
            continue
        rows = {(r["family"], r["layer"]): r for r in csv.DictReader(open(path))}
        for family in dict.fromkeys(f for f, _ in rows):
            one, three = rows[(family, "1")], rows[(family, "3")]
            cell = lambda r, m: "%.2f [%.2f, %.2f]" % (float(r[m]), float(r[m + "_low"]), float(r[m + "_high"]))
            print(f"| {model} | {family} | {one['questions']} | {cell(one, 'on_asked')} | {cell(one, 'on_other')} | "
                  f"{cell(three, 'on_asked')} | {cell(three, 'on_other')} | "
                  "%+.2f [%+.2f, %+.2f] |" % tuple(float(three[m]) for m in ("asked_minus_other", "asked_minus_other_low",
                                                                             "asked_minus_other_high")))


if __name__ == "__main__":
    niah_table(families=tuple(sys.argv[1:]) or FAMILIES)
    lookup_table()
    binding_table()
