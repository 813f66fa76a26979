"""Pilot N (pilot M with each fact recalled up to 3 times, in distinct forms) beside pilots C, H, K, L and M, from
the CSVs of this folder and of the earlier sessions' folders:
``python docs/results/recall_v5_pilots/session_2026-12-07c/tables.py``.

The same tables as ``../session_2026-12-07b/tables.py`` (NIAH: 2 needles, 2 passes, 50 questions per (family,
length) and seed; exact match pooled over the seeds' questions [Wilson 95%] n (each seed); likelihood margins in
nats per answer token, the seeds' mean [t 95%]; binding: the share of the answer's read weight on the asked
needle's value slots minus the other needle's). Pilot N's validation perplexity is not comparable with the others'
(its validation rows hold more recalls); compare the loss by position on plain text instead."""

import csv
import importlib.util
from pathlib import Path

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("tables_2026_12_07b", HERE.parent / "session_2026-12-07b" / "tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)

tables.MODELS["N"] = [(HERE, (f"N_fwpkm_seed{s}",), f"N_fwpkm_seed{s}") for s in (0, 1)]
tables.BINDING_DIRS["N"] = [(HERE, f"N_fwpkm_seed{s}") for s in (0, 1)]
_earlier_val_ppl = tables.val_ppl


def val_ppl(model: str) -> list:
    if model != "N":
        return _earlier_val_ppl(model)
    return [float(r["val_ppl"]) for r in csv.DictReader(open(HERE / "val_pilots.csv")) if r["pilot"] == "pilotN"]


tables.val_ppl = val_ppl

if __name__ == "__main__":
    tables.headline_table()
    tables.family_table()
    tables.binding_table()
    tables.position_table()
