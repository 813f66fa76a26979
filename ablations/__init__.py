"""Ablation grids, Optuna studies and reports on top of ``fwpkm train`` (issue 5).

* :mod:`ablations.grid`: grids as data (``ablations/grids/*.yaml``): a base ``fwpkm train``
  config, named variants as dotted overrides, seeds, optional evaluations; resolving and
  validating runs without building a model.
* :mod:`ablations.runner`: ``fwpkm ablate GRID``: every run a ``fwpkm train`` subprocess,
  tracked as an MLflow run linked to the grid's parent run; skip / resume / fail logic.
* :mod:`ablations.tune`: ``fwpkm tune GRID``: an Optuna study (TPE, median pruning through
  Lightning) over the addressing-loss weight and any other config option.
* :mod:`ablations.report`: ``fwpkm report GRID|STUDY``: summary tables and plots rebuilt from
  the MLflow store alone.
* :mod:`ablations.cli`: registers the three subcommands with :mod:`lit.cli`.
"""

from pathlib import Path

GRIDS_DIR = Path(__file__).resolve().parent / "grids"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
