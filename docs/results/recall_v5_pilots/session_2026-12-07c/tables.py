"""Pilots N (pilot M with each fact recalled up to 3 times, in distinct forms), O (pilot M with the query loss) and P
(O with N's recalls) beside pilots C, H, K, L and M, from
the CSVs of this folder and of the earlier sessions' folders:
``python docs/results/recall_v5_pilots/session_2026-12-07c/tables.py``.

The same tables as ``../session_2026-12-07b/tables.py`` (NIAH: 2 needles, 2 passes, 50 questions per (family,
length) and seed; exact match pooled over the seeds' questions [Wilson 95%] n (each seed); likelihood margins in
nats per answer token, the seeds' mean [t 95%]; binding: the share of the answer's read weight on the asked
needle's value slots minus the other needle's). N's and P's validation perplexity is not comparable with the
others' (their validation rows hold more recalls); compare the loss by position on plain text instead."""

import csv
import importlib.util
from pathlib import Path

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("tables_2026_12_07b", HERE.parent / "session_2026-12-07b" / "tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)

SEEDS = {"N": (0, 1), "O": (0, 1, 2), "P": (0,)}
for _pilot, _seeds in SEEDS.items():
    tables.MODELS[_pilot] = [(HERE, (f"{_pilot}_fwpkm_seed{s}",), f"{_pilot}_fwpkm_seed{s}") for s in _seeds]
    tables.BINDING_DIRS[_pilot] = [(HERE, f"{_pilot}_fwpkm_seed{s}") for s in _seeds]
_earlier_val_ppl = tables.val_ppl


def val_ppl(model: str) -> list:
    if model not in SEEDS:
        return _earlier_val_ppl(model)
    return [float(r["val_ppl"]) for r in csv.DictReader(open(HERE / "val_pilots.csv")) if r["pilot"] == f"pilot{model}"]


tables.val_ppl = val_ppl

if __name__ == "__main__":
    tables.headline_table()
    tables.family_table()
    tables.binding_table()
    tables.position_table()
