#!/usr/bin/env python
"""Compare the train/loss curves of two training runs step by step: did a change move the result?

Each argument is a run folder made by ``fwpkm train`` (its MLflow store is the runs folder's
``mlflow.db``, its run id in ``<run folder>/mlflow_run_id``) or ``STORE_URI#RUN_ID``. Prints the
steps compared, the first step whose losses differ, the last step up to which every loss agrees
within --rtol, and the largest relative difference. Exit status 1 when they differ beyond --rtol.

Example (the recall grid's FwPKM model, 100 steps, in two checkouts)::

    fwpkm train --config recall100.yaml --run_dir /tmp/a/run    # in the old checkout
    fwpkm train --config recall100.yaml --run_dir /tmp/b/run    # in this one
    python benchmarks/compare_curves.py /tmp/a/run /tmp/b/run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def loss_curve(where: str, metric: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    if "#" in where:
        uri, run_id = where.rsplit("#", 1)
    else:
        run_dir = Path(where)
        uri = f"sqlite:///{(run_dir.parent / 'mlflow.db').resolve()}"
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, metric)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--metric", default="train/loss", help="the metric compared (default train/loss)")
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance (default 1e-5)")
    ns = p.parse_args(argv)
    a, b = loss_curve(ns.first, ns.metric), loss_curve(ns.second, ns.metric)
    steps = sorted(set(a) & set(b))
    if not steps:
        print(f"no common steps of {ns.metric}", file=sys.stderr)
        return 2
    rel = {s: abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in steps}
    first_diff = next((s for s in steps if a[s] != b[s]), None)
    beyond = [s for s in steps if rel[s] > ns.rtol]
    agree_to = steps[-1] if not beyond else max([s for s in steps if s < beyond[0]], default=None)
    print(f"{ns.metric}: {len(steps)} common steps ({steps[0]}..{steps[-1]}); first step that differs: {first_diff}; "
          f"within rtol {ns.rtol:g} through step {agree_to}; largest relative difference {max(rel.values()):.3g}; "
          f"last step {a[steps[-1]]:.6g} vs {b[steps[-1]]:.6g}")
    return 1 if beyond else 0


if __name__ == "__main__":
    sys.exit(main())
