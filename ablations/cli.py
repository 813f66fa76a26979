"""The ``fwpkm ablate``, ``fwpkm tune`` and ``fwpkm report`` subcommands (listed in :mod:`ablations.__main__`)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from lit.usage import OneLineParser, int_at_least

STORE_HELP = ("MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<runs-dir>/mlflow.db "
              "with artifacts in <runs-dir>/mlartifacts)")


ABLATE_DESCRIPTION = """\
Run every (variant, seed) of an ablation grid as a `fwpkm train` subprocess, tracked in MLflow under
one parent run per grid. Finished runs (same config hash) are skipped, interrupted ones resume from
their last checkpoint, failed ones are recorded and the others go on. Ends with a summary table
(printed, CSV, Markdown, plot) attached to the parent run.
"""

TUNE_DESCRIPTION = """\
An Optuna study on the base config of a grid: by default the addressing-loss weight
(model.block.memory.addr_loss_weight, log-uniform), more parameters in the grid's `tune.params`. TPE
sampler, median pruning on the validation loss through Lightning; every trial a `fwpkm train`
subprocess and an MLflow run linked to the study's run. The study lives in an Optuna storage
(default: SQLite in <runs-dir>/tune/optuna.db), so an interrupted study resumes, and any number of
workers (here or on other machines, e.g. with a PostgreSQL --storage) can share it. --n-trials is
the study's total: running again with a larger number adds trials.
"""

ABLATE_EXAMPLES = """\
  fwpkm ablate smoke
  fwpkm ablate tiny --dry-run
  fwpkm ablate tiny --workers 2 --only base dot --seeds 0 1
  fwpkm ablate paper --gpus 0,1,2,3,4,5,6,7 --set data.source=hf:HuggingFaceFW/fineweb-edu
  fwpkm ablate mqar --storage postgresql://user@db/fwpkm --tracking-uri http://mlflow:5000   # on every machine
"""

TUNE_EXAMPLES = """\
  fwpkm tune tiny --n-trials 20 --workers 2
  fwpkm tune tiny --storage postgresql://user@db/optuna --n-trials 100   # on every machine
  optuna-dashboard sqlite:///runs/tune/optuna.db
"""

REPORT_DESCRIPTION = """\
Rebuild the summary table (printed, CSV, Markdown) and plots of an ablation grid or an Optuna study
from the MLflow store alone, and attach them to its parent run.
"""


def _grids_epilog() -> str:
    from ablations.grid import grid_names

    return "shipped grids: " + ", ".join(grid_names()) + " (ablations/grids/*.yaml); any grid YAML path works too"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", default="runs", help="runs folder (run folders, default MLflow store); default: runs")
    parser.add_argument("--tracking-uri", default=None, help=STORE_HELP)


def _sets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override the grid's base train config, e.g. --set trainer.max_steps=100 "
                             "--set data.tokenizer=/models/mistral (values are YAML; repeatable)")


def _parser(prog: str, description: str, examples: str = "") -> argparse.ArgumentParser:
    """A subcommand's parser; with ``examples``, its epilog lists the shipped grids and the examples."""
    epilog = f"{_grids_epilog()}\n\nexamples:\n{examples}" if examples else ""
    return OneLineParser(prog=prog, description=description, epilog=epilog,
                         formatter_class=argparse.RawDescriptionHelpFormatter)


def _error(prog: str, err: Exception) -> int:
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------- ablate


def ablate(argv: list[str]) -> Optional[int]:
    """Run an ablation grid (ablations/grids/*.yaml) as MLflow runs linked to one parent run."""
    parser = _parser("fwpkm ablate", ABLATE_DESCRIPTION, ABLATE_EXAMPLES)
    parser.add_argument("grid", help="grid name (ablations/grids/<name>.yaml) or path to a grid YAML file")
    parser.add_argument("--dry-run", action="store_true",
                        help="print and validate the resolved runs (config dataclasses only, no model) and exit")
    parser.add_argument("--only", nargs="+", metavar="NAME", default=None, help="run only these variants")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: the grid's)")
    parser.add_argument("--workers", type=int_at_least(1), default=None,
                        help="runs at a time (default: 1, or the number of --gpus)")
    parser.add_argument("--gpus", default=None,
                        help="comma-separated GPU indices, one run per GPU at a time (e.g. 0,1,2,3; 'all')")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per training run before it is stopped "
                                                                    "and recorded as failed")
    parser.add_argument("--storage", default=None,
                        help="Optuna RDB storage URL (postgresql://...) holding the grid's cells as a queue that "
                             "`fwpkm ablate` processes on any machines share; default: none (this machine only)")
    parser.add_argument("--heartbeat", type=float, default=60.0,
                        help="with --storage: seconds between a running cell's heartbeats; a cell silent for 3 "
                             "heartbeats is taken over by another worker (default: 60)")
    _sets(parser)
    _common(parser)
    args = parser.parse_args(argv)
    from ablations.grid import GridError, parse_sets
    from ablations.runner import ablate as run
    from ablations.storage import StorageError

    try:
        gpus = _gpus(args.gpus)
        sets = parse_sets(args.sets)
        if args.heartbeat <= 0:
            raise GridError(f"--heartbeat {args.heartbeat:g}: must be a positive number of seconds")
        return run(args.grid, runs_dir=args.runs_dir, tracking_uri=args.tracking_uri, only=args.only,
                   seeds=args.seeds, workers=args.workers or (len(gpus) if gpus else 1), gpus=gpus, sets=sets,
                   dry_run=args.dry_run, timeout=args.timeout, storage=args.storage, heartbeat_s=args.heartbeat)
    except (GridError, LookupError, StorageError) as err:
        return _error("fwpkm ablate", err)


def _gpus(text: Optional[str]) -> Optional[list[str]]:
    if not text:
        return None
    if text == "all":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise LookupError("--gpus all: no CUDA device is visible")
        return [str(i) for i in range(n)]
    return [g.strip() for g in text.split(",") if g.strip()]


# --------------------------------------------------------------------------- tune


def tune(argv: list[str]) -> Optional[int]:
    """Optuna study (TPE, median pruning) over the addressing-loss weight and other options of a grid's base."""
    parser = _parser("fwpkm tune", TUNE_DESCRIPTION, TUNE_EXAMPLES)
    parser.add_argument("grid", help="grid name or YAML path whose base config (and `tune:` section) defines the study")
    parser.add_argument("--study-name", default=None, help="default: the grid's tune.study, else <grid>-addr_loss")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL (default: sqlite:///<runs-dir>/tune/optuna.db); "
                             "postgresql://... for workers on many machines")
    parser.add_argument("--n-trials", type=int_at_least(1), default=None,
                        help="total trials of the study (default: the grid's tune.n_trials, else 20)")
    parser.add_argument("--workers", type=int_at_least(1), default=1,
                        help="worker processes started here on the same study")
    parser.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    parser.add_argument("--trial-timeout", type=float, default=None, help="seconds per trial before it fails")
    parser.add_argument("--seed", type=int, default=None, help="sampler seed (worker i uses seed + i)")
    parser.add_argument("--heartbeat", type=float, default=30.0,
                        help="seconds between a running trial's heartbeats in an RDB storage; a trial silent for 3 "
                             "heartbeats is failed and retried by another worker, resuming its folder (default: 30)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a worker started by --workers
    _sets(parser)
    _common(parser)
    args = parser.parse_args(argv)
    from ablations.grid import GridError, parse_sets
    from ablations.tune import TuneError
    from ablations.tune import tune as run

    try:
        return run(args.grid, study_name=args.study_name, storage=args.storage, n_trials=args.n_trials,
                   workers=args.workers, timeout=args.timeout, trial_timeout=args.trial_timeout, seed=args.seed,
                   runs_dir=args.runs_dir, tracking_uri=args.tracking_uri, sets=parse_sets(args.sets),
                   worker_only=args.worker, argv=argv, heartbeat_s=args.heartbeat)
    except (GridError, TuneError, LookupError) as err:
        return _error("fwpkm tune", err)


# --------------------------------------------------------------------------- report


def report(argv: list[str]) -> Optional[int]:
    """Rebuild a grid's or study's summary table and plots from the MLflow store alone."""
    parser = _parser("fwpkm report", REPORT_DESCRIPTION)
    parser.add_argument("name", help="grid name (as run by fwpkm ablate) or study name (fwpkm tune)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: <runs-dir>/ablations/<grid> or <runs-dir>/tune/<study>)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment to look in (default: all)")
    parser.add_argument("--no-log", action="store_true", help="do not attach the files to the parent run")
    _common(parser)
    args = parser.parse_args(argv)
    from ablations.report import report as run

    try:
        return run(args.name, runs_dir=args.runs_dir, tracking_uri=args.tracking_uri, out_dir=args.out,
                   log=not args.no_log, experiment=args.experiment)
    except LookupError as err:
        return _error("fwpkm report", err)

