"""Writes val_pilots.csv and addressing_pilots.csv of this folder from the MLflow store of the runs:
``python docs/results/recall_v5_pilots/session_2026-12-07c/from_mlflow.py [sqlite:///runs/mlflow.db] [pilotN ...]``."""

import csv
import math
import statistics
import sys
from pathlib import Path

import mlflow

HERE = Path(__file__).parent
STATS = ("coverage_ratio", "collision_ratio", "kl_to_uniform", "gate_mean")


def main(uri: str = "sqlite:///runs/mlflow.db", grids: tuple = ("pilotN",)) -> None:
    client = mlflow.MlflowClient(uri)
    val, addressing = [], []
    for grid in grids:
        experiment = client.get_experiment_by_name(grid)
        runs = [r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("mlflow.runName", "").startswith(f"{grid}/")]
        for run in sorted(runs, key=lambda r: r.data.tags["mlflow.runName"]):
            name = run.data.tags["mlflow.runName"]
            loss = run.data.metrics["val/embedded/loss"]
            speed = [m.value for m in client.get_metric_history(run.info.run_id, "train/tokens_per_s")]
            val.append({"pilot": grid, "seed": name.rsplit("seed", 1)[1], "val_loss": round(loss, 7),
                        "val_ppl": round(math.exp(loss), 4), "tokens_per_s": round(statistics.median(speed))})
            row = {"run": name}
            for layer in (1, 3):
                for stat in STATS:
                    late = [m.value for m in client.get_metric_history(run.info.run_id, f"mem/L{layer}/{stat}")
                            if 2500 <= m.step <= 3000]
                    row[f"L{layer}_{stat}"] = f"{statistics.mean(late):.4f}" if late else ""
            addressing.append(row)
    for path, rows in ((HERE / "val_pilots.csv", val), (HERE / "addressing_pilots.csv", addressing)):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path} ({len(rows)} rows)")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["sqlite:///runs/mlflow.db"]), tuple(sys.argv[2:]) or ("pilotN",))
