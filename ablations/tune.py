"""``fwpkm tune GRID``: an Optuna study over the addressing-loss weight (and more) of a grid's base.

The study is defined by the grid file: its ``base`` train config and its ``tune:`` section::

    tune:
      study: tiny-addr_loss          # default: <grid>-addr_loss
      n_trials: 20                   # the study's total number of trials
      direction: minimize            # the objective is the final validation loss, ln(val/ppl)
      params:                        # dotted train-config paths (as in variants) -> distribution
        model.block.memory.addr_loss_weight: {low: 1.0e-3, high: 10.0, log: true}
        # `disabled:` adds one trial at the switched-off point (here: no addressing loss at all)
        # model.block.memory.addr_loss_weight: {low: 1.0e-3, high: 100.0, log: true,
        #   disabled: {model.block.memory.addr_loss_weight: null, model.block.memory.grad_to_values_only: false}}
        optim.lr: {low: 1.0e-4, high: 3.0e-3, log: true}
        model.block.memory.topk: {type: int, low: 4, high: 32, step: 4}
        model.block.memory.score: {type: categorical, choices: [idw, dot]}
      overrides: {trainer.max_steps: 200}   # applied to the base for the trials
      pruner: {type: median, n_startup_trials: 3, n_warmup_steps: 0, interval_steps: 1}
      sampler: {n_startup_trials: 5}        # TPE options

Without ``params`` the study tunes the addressing-loss weight, log-uniform on [1e-3, 10].

Several objectives (a multi-objective study, Optuna's Pareto front) replace ``direction``::

      objectives:                    # val_loss: ln(val/ppl); any other name: a metric of tune.eval
        - {metric: mqar/acc/P1024, direction: maximize}
        - {metric: val_loss, direction: minimize}
      eval: {mqar: {pairs: [1024], samples: 16}}   # run on each trial's checkpoint (as a grid's eval)
      sampler: {type: tpe}           # tpe (multi-objective TPE), nsga2 or random

Optuna cannot prune a multi-objective trial (``Trial.report`` is single-objective) and a trial
behind on the loss may still be on the front for recall, so such a study takes ``pruner: none``.
The recommended trial of a front is the one nearest the utopia point once each objective is
scaled to [0, 1] over the front (:func:`ablations.report.recommended_index`).

* TPE sampler (``constant_liar`` so parallel workers do not pick the same point), median
  pruning on the validation loss: :class:`OptunaPruning` runs inside the trial's Lightning
  training, reports ``ln(val/ppl)`` at every validation (step = optimizer step) and stops the
  training when the pruner says so (the step-based equivalent of optuna-integration's
  ``PyTorchLightningPruningCallback``, which reports per epoch).
* Each trial is a ``fwpkm train`` subprocess in ``<runs>/tune/<study>/trial<NNNN>/`` and an
  MLflow run nested under the study's run (tags ``optuna.study``, ``optuna.trial_number``,
  ``optuna.params``, ``optuna.state``; metric ``optuna/value``).
* Storage: any Optuna storage URL (``--storage``), default ``sqlite:///<runs>/tune/optuna.db``.
  ``--n-trials`` is the study's total: a second invocation with a larger number adds trials.
  Workers (``--workers N`` here, or more ``fwpkm tune`` processes anywhere on the same storage)
  claim trials under a lock, so the study gets exactly ``n_trials`` trials (with a shared
  network storage and no shared folder, workers on different machines can overshoot by at
  most one trial each). A running trial records Optuna's heartbeat in an RDB storage
  (``--heartbeat``); Optuna fails a trial whose worker stopped beating for 3 heartbeats and
  enqueues it again (``RetryHeartbeatStaleTrialCallback``, intermediate values kept), and the
  worker that takes the retry resumes the first trial's folder from its last checkpoint.
* At the end: best value and parameters (printed, tags ``best.*`` and metric ``best_value`` on
  the study's run), Optuna's optimisation-history, parameter-importance and slice plots, and
  the trial table, all attached to the study's run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from lightning.pytorch.callbacks import Callback

from ablations.grid import apply, check_grid_run, load_grid
from lit.config import RunConfig, dump_yaml
from ablations.launch import CONFIG_FILE, LOG_FILE, child_env, error_line, failure_text, run_training, stop
from ablations.runner import EVALUATORS, MAX_TAG, threads_per_worker
from ablations.storage import Heartbeat, heartbeat_storage, public_url, retried_from, storage_object
from lit.tracking import (PARENT_TAG, Store, browse_hint, ensure_parent, file_lock, open_store, read_run_id,
                          search_runs, set_running, tag_filter)

STORAGE_ENV = "FWPKM_OPTUNA_STORAGE"
PRUNED_FILE = "optuna_pruned"
TRIAL_FILE = "optuna_trial.json"
DEFAULT_PARAMS = {"model.block.memory.addr_loss_weight": {"type": "float", "low": 1e-3, "high": 10.0,
                                                                   "log": True}}
VAL_LOSS = "val_loss"  # the objective ln(val/ppl) at the last validation
OFF_ATTR = "disabled"  # user attribute of the trial at a parameter's switched-off point
HEARTBEAT_S = 30.0  # a trial silent for 3 heartbeats is failed by Optuna and retried by the next worker
MAX_CONSECUTIVE_FAILURES = 3


class TuneError(ValueError):
    """An invalid study definition or option."""


# --------------------------------------------------------------------------- definitions


def distributions(params: dict) -> dict:
    """``tune.params`` -> Optuna distributions (float by default; int; categorical)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for name, spec in (params or {}).items():
        if not isinstance(spec, dict):
            raise TuneError(f"tune.params.{name}: expected a mapping like {{low: 1e-3, high: 10, log: true}}")
        spec = {k: v for k, v in spec.items() if k != "disabled"}
        kind = spec.get("type", "categorical" if "choices" in spec else "float")
        try:
            if kind == "float":
                out[name] = FloatDistribution(float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)),
                                              step=spec.get("step"))
            elif kind == "int":
                out[name] = IntDistribution(int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False)),
                                            step=int(spec.get("step", 1)))
            elif kind == "categorical":
                out[name] = CategoricalDistribution(list(spec["choices"]))
            else:
                raise TuneError(f"tune.params.{name}: type {kind!r} is not one of float, int, categorical")
        except KeyError as err:
            raise TuneError(f"tune.params.{name}: missing {err.args[0]!r}") from err
        except ValueError as err:
            raise TuneError(f"tune.params.{name}: {err}") from err
    if not out:
        raise TuneError("the study has no parameters (tune.params is empty)")
    return out


def make_pruner(spec: Optional[dict]):
    import optuna

    spec = dict(spec or {})
    kind = spec.pop("type", "median")
    try:
        if kind == "median":
            return optuna.pruners.MedianPruner(**spec)
        if kind == "percentile":
            return optuna.pruners.PercentilePruner(**spec)
        if kind == "threshold":
            return optuna.pruners.ThresholdPruner(**spec)
        if kind in ("none", "nop", None):
            return optuna.pruners.NopPruner()
    except TypeError as err:
        raise TuneError(f"tune.pruner: {err}") from err
    raise TuneError(f"tune.pruner.type={kind!r}; choose one of median, percentile, threshold, none")


def objectives(spec: dict) -> list[dict]:
    """``tune.objectives`` (or the single ``direction`` on the validation loss) -> [{metric, direction}]."""
    if "objectives" not in spec:
        direction = str(spec.get("direction", "minimize"))
        if direction not in ("minimize", "maximize"):
            raise TuneError(f"tune.direction={direction!r}; choose minimize or maximize")
        return [{"metric": VAL_LOSS, "direction": direction}]
    if "direction" in spec:
        raise TuneError("tune: give either direction (one objective: the validation loss) or objectives, not both")
    items = spec["objectives"]
    if not isinstance(items, list) or not items:
        raise TuneError("tune.objectives: expected a list like [{metric: val_loss, direction: minimize}]")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"metric", "direction"} or "metric" not in item:
            raise TuneError(f"tune.objectives[{i}]={item!r}: expected {{metric: NAME, direction: minimize|maximize}}")
        direction = str(item.get("direction", "minimize"))
        if direction not in ("minimize", "maximize"):
            raise TuneError(f"tune.objectives[{i}].direction={direction!r}; choose minimize or maximize")
        out.append({"metric": str(item["metric"]), "direction": direction})
    if len({o["metric"] for o in out}) != len(out):
        raise TuneError(f"tune.objectives: a metric appears twice in {[o['metric'] for o in out]}")
    return out


def evaluations(spec, objective_list: list[dict]) -> dict:
    """``tune.eval`` ({evaluation: options}, as a grid's ``eval``); needed by any objective but val_loss."""
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(EVALUATORS))
    if unknown:
        raise TuneError(f"tune.eval: unknown evaluation(s) {unknown}; choose from {sorted(EVALUATORS)}")
    if not spec and any(o["metric"] != VAL_LOSS for o in objective_list):
        raise TuneError(f"tune.objectives use {[o['metric'] for o in objective_list if o['metric'] != VAL_LOSS]} "
                        f"but tune.eval is empty: name the evaluation that produces them ({sorted(EVALUATORS)})")
    return spec


def off_points(params: dict) -> dict:
    """``{param: overrides}`` for every parameter with a ``disabled:`` point (one trial of its own)."""
    out = {}
    for name, spec in (params or {}).items():
        if isinstance(spec, dict) and False in spec:  # YAML 1.1 reads an unquoted `off:` key as False
            raise TuneError(f"tune.params.{name}: a key `off` reads as false in YAML; the switched-off point is `disabled:`")
        if isinstance(spec, dict) and "disabled" in spec:
            if not isinstance(spec["disabled"], dict) or not spec["disabled"]:
                raise TuneError(f"tune.params.{name}.disabled: expected the overrides of the switched-off point, "
                                "e.g. {model.block.memory.addr_loss_weight: null}")
            out[name] = dict(spec["disabled"])
    return out


class Setup:
    """Everything a worker needs to know about the study."""

    def __init__(self, grid_name: str, study_name: Optional[str], storage: Optional[str], n_trials: Optional[int],
                 runs_dir: str, tracking_uri: Optional[str], sets: Optional[dict], seed: Optional[int],
                 trial_timeout: Optional[float], heartbeat_s: float = HEARTBEAT_S, echo: Callable[[str], None] = print):
        self.grid = load_grid(grid_name)
        if not heartbeat_s > 0:
            raise TuneError(f"--heartbeat {heartbeat_s:g}: must be a positive number of seconds")
        self.heartbeat_s, self.echo = float(heartbeat_s), echo
        spec = dict(self.grid.tune or {})
        unknown = sorted(set(spec) - {"study", "n_trials", "direction", "objectives", "eval", "params", "overrides",
                                      "pruner", "sampler", "seed"})
        if unknown:
            raise TuneError(f"grid {self.grid.name!r}: unknown tune option(s) {unknown}")
        self.name = study_name or spec.get("study") or f"{self.grid.name}-addr_loss"
        if any(c in self.name for c in "/\\'\"` "):
            raise TuneError(f"study name {self.name!r} must not contain '/', quotes or spaces")
        self.runs_dir = Path(runs_dir).resolve()
        self.storage_url = storage or f"sqlite:///{self.runs_dir / 'tune' / 'optuna.db'}"
        self.n_trials = int(n_trials if n_trials is not None else spec.get("n_trials", 20))
        if self.n_trials < 1:
            raise TuneError(f"--n-trials={self.n_trials} must be >= 1")
        self.objectives = objectives(spec)
        self.direction = self.objectives[0]["direction"]
        self.eval = evaluations(spec.get("eval"), self.objectives)
        self.params_spec = spec.get("params") or DEFAULT_PARAMS
        self.distributions = distributions(self.params_spec)
        self.off_points = off_points(self.params_spec)
        self.pruner_spec = dict(spec.get("pruner") or {"type": "median" if self.prunes else "none"})
        if not self.prunes and self.pruner_spec.get("type", "median") not in ("none", "nop"):
            reason = (f"a study with {len(self.objectives)} objectives cannot prune (Optuna reports one value per "
                      "step, and a trial behind on one objective may lead on another)" if self.multi else
                      f"the pruner sees the validation loss during training, not {self.objectives[0]['metric']}")
            raise TuneError(f"tune.pruner.type={self.pruner_spec.get('type', 'median')!r}: {reason}; "
                            "use pruner: {type: none}")
        make_pruner(self.pruner_spec)  # check now
        self.sampler_spec = dict(spec.get("sampler") or {})
        self.seed = seed if seed is not None else spec.get("seed")
        self.trial_timeout = trial_timeout
        base = apply(self.grid.base, spec.get("overrides") or {})
        base = apply(base, sets or {})  # the command line wins
        base.pop("run_dir", None)
        base["seed_everything"] = int(base.get("seed_everything", self.grid.seeds[0]) or 0)
        self.base = base
        self.tracking_uri = tracking_uri
        self.threads: Optional[int] = None  # per trial, when several workers share this machine
        self.store: Optional[Store] = None
        self.parent_id: Optional[str] = None

    @property
    def folder(self) -> Path:
        return self.runs_dir / "tune" / self.name

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    @property
    def prunes(self) -> bool:
        """Pruning on the validation loss reported during training: sound when it is the only objective."""
        return [o["metric"] for o in self.objectives] == [VAL_LOSS]

    @property
    def directions(self) -> list[str]:
        return [o["direction"] for o in self.objectives]

    def trial_config(self, params: dict, off: Optional[str] = None) -> dict:
        config = apply(self.base, params)
        if off and off not in self.off_points:
            raise TuneError(f"study {self.name!r} has a trial at the disabled point of {off!r}, but tune.params.{off} "
                            "has no `disabled:` any more; restore it or give the study another name (--study-name)")
        return apply(config, self.off_points[off]) if off else config

    def check(self) -> None:
        """Validate the trial config at a sample point of the space (config dataclasses only)."""
        sample = {}
        for name, dist in self.distributions.items():
            if hasattr(dist, "choices"):
                sample[name] = dist.choices[0]
            else:
                sample[name] = dist.low
        try:
            check_grid_run(RunConfig.from_dict(self.trial_config(sample)))
            for name in self.off_points:
                check_grid_run(RunConfig.from_dict(self.trial_config(sample, off=name)))
        except Exception as err:
            raise TuneError(f"study {self.name!r}: the trial config is invalid: {type(err).__name__}: {err}") from err

    def lock(self):
        """A lock shared by the workers of this machine (next to a SQLite storage, else in the runs folder)."""
        if self.storage_url.startswith("sqlite:///"):
            db = Path(self.storage_url[len("sqlite:///"):])
            db.parent.mkdir(parents=True, exist_ok=True)
            return file_lock(db.with_name(f"{db.name}.{self.name}.lock"))
        self.folder.mkdir(parents=True, exist_ok=True)
        return file_lock(self.folder.parent / f".{self.name}.lock")

    def sampler(self, offset: int = 0):
        """TPE; with a seed, ``seed + offset``: the worker reseeds it before every new trial with the
        number of trials so far, so a resumed study does not replay the samples of its first run."""
        import optuna

        seed = None if self.seed is None else int(self.seed) + offset
        options = dict(self.sampler_spec)
        kind = options.pop("type", "tpe")
        try:
            if kind == "tpe":
                return optuna.samplers.TPESampler(seed=seed, **{"constant_liar": True, **options})
            if kind == "nsga2":
                return optuna.samplers.NSGAIISampler(seed=seed, **options)
            if kind == "random":
                return optuna.samplers.RandomSampler(seed=seed, **options)
        except TypeError as err:
            raise TuneError(f"tune.sampler: {err}") from err
        raise TuneError(f"tune.sampler.type={kind!r}; choose one of tpe, nsga2, random")

    def load(self, worker_index: int = 0):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the workers print their own lines
        self.heartbeats = "://" in self.storage_url and not self.storage_url.startswith(("redis", "journal"))
        self.optuna_storage = (heartbeat_storage(self.storage_url, self.heartbeat_s, inherit_intermediate_values=True)
                               if self.heartbeats else storage_object(self.storage_url))
        with self.lock():
            study = optuna.create_study(study_name=self.name, storage=self.optuna_storage,
                                        directions=self.directions, sampler=self.sampler(worker_index),
                                        pruner=make_pruner(self.pruner_spec), load_if_exists=True)
        if [d.name.lower() for d in study.directions] != self.directions:
            raise TuneError(f"study {self.name!r} in {public_url(self.storage_url)} has directions "
                            f"{[d.name.lower() for d in study.directions]}, the grid asks for {self.directions}: "
                            "give this study another name (--study-name)")
        stored = study.user_attrs.get("objectives")
        if stored is None:
            study.set_user_attr("objectives", self.objectives)
        elif stored != self.objectives:
            raise TuneError(f"study {self.name!r} in {public_url(self.storage_url)} has objectives "
                            f"{[o['metric'] for o in stored]}, the grid asks for {[o['metric'] for o in self.objectives]}: "
                            "give this study another name (--study-name)")
        return study


# --------------------------------------------------------------------------- MLflow


def objective_text(objective_list: list[dict]) -> str:
    names = {VAL_LOSS: "final validation loss ln(val/ppl)"}
    return "; ".join(f"{o['direction']} {names.get(o['metric'], o['metric'])}" for o in objective_list)


def study_parent(setup: Setup, study) -> str:
    """The study's MLflow run (found by its tags, created once), also recorded in the study's user attrs."""
    from optuna.distributions import distribution_to_json

    tags = {"optuna.study": setup.name, "optuna.storage": public_url(setup.storage_url),
            "optuna.direction": setup.direction, "optuna.objective": objective_text(setup.objectives),
            "optuna.objectives": json.dumps(setup.objectives),
            "fwpkm.grid_file": str(setup.grid.path),
            "optuna.distributions": json.dumps({k: distribution_to_json(v) for k, v in setup.distributions.items()})}
    run_id = ensure_parent(setup.store, "study", setup.name, tags)
    client = setup.store.client
    for k, v in tags.items():
        client.set_tag(run_id, k, v[:MAX_TAG])
    with contextlib.suppress(Exception):
        if study.user_attrs.get("mlflow_run_id") != run_id:
            study.set_user_attr("mlflow_run_id", run_id)
            study.set_user_attr("mlflow_tracking_uri", setup.store.uri)
    return run_id


# --------------------------------------------------------------------------- the pruning callback


class OptunaPruning(Callback):
    """Report ``ln(monitor)`` (``val/ppl`` -> validation loss) to the Optuna trial after every
    validation, at the optimizer step, and stop training when the trial should be pruned.

    Runs inside the trial's ``fwpkm train`` process; the trial lives in the storage named by
    ``$FWPKM_OPTUNA_STORAGE`` (or ``storage``). On pruning it writes ``optuna_pruned`` into
    the run folder and sets ``trainer.should_stop``: the training ends cleanly (checkpoint,
    MLflow run FINISHED) and the worker tells Optuna the trial was pruned.

    Args:
        study_name: the Optuna study.
        trial_id: the trial's storage id (``trial._trial_id``).
        monitor: the validation metric; ``val/ppl`` is the first validation set's perplexity.
        log_value: report ``ln(value)`` (a perplexity becomes a loss).
        pruner: pruner spec (``{"type": "median", ...}``, see :func:`make_pruner`).
        storage: storage URL; default ``$FWPKM_OPTUNA_STORAGE``.
        run_dir: where to write the ``optuna_pruned`` marker; default the trainer's root dir.
    """

    def __init__(self, study_name: str, trial_id: int, monitor: str = "val/ppl", log_value: bool = True,
                 pruner: Optional[dict] = None, storage: Optional[str] = None, run_dir: Optional[str] = None):
        super().__init__()
        self.study_name, self.trial_id, self.monitor = study_name, int(trial_id), monitor
        self.log_value, self.pruner, self.run_dir = log_value, pruner, run_dir
        self.storage = storage
        self._trial = None

    def trial(self):
        if self._trial is None:
            import optuna

            url = self.storage or os.environ.get(STORAGE_ENV)
            if not url:
                raise RuntimeError(f"OptunaPruning: no storage (set ${STORAGE_ENV})")
            study = optuna.load_study(study_name=self.study_name, storage=storage_object(url),
                                      pruner=make_pruner(self.pruner))
            self._trial = optuna.trial.Trial(study, self.trial_id)
        return self._trial

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        should_stop = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
                value = float(value)
                if self.log_value:
                    value = math.log(value) if value > 0 else float("nan")
                trial = self.trial()
                step = int(trainer.global_step)
                if math.isfinite(value) and step not in trial.study._storage.get_trial(self.trial_id).intermediate_values:
                    trial.report(value, step)
                should_stop = bool(trial.should_prune())
                if should_stop:
                    folder = Path(self.run_dir or trainer.default_root_dir)
                    (folder / PRUNED_FILE).write_text(f"{step}\n")
                    print(f"[tune] trial pruned at step {step} (value {value:.4f})", flush=True)
        if trainer.world_size > 1:
            should_stop = bool(trainer.strategy.broadcast(should_stop))
        if should_stop:
            trainer.should_stop = True


# --------------------------------------------------------------------------- workers


def claim(setup: Setup, study, worker_index: int = 0):
    """The next trial for this worker: a WAITING retry of a trial whose worker died (Optuna fails a
    trial without heartbeat and enqueues it again), else a new one while the study has fewer than
    ``n_trials``; waits while other workers' trials run (they may still go stale); None when done."""
    import optuna
    from optuna.trial import TrialState

    announced = False
    while True:
        with setup.lock():
            if setup.heartbeats:
                optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            if any(t.state == TrialState.WAITING for t in trials):
                return study.ask(), True
            started = [t for t in trials if original_number(t) == t.number]  # a retry is not a new trial
            if len(started) < setup.n_trials:
                taken = {t.user_attrs.get(OFF_ATTR) for t in trials}
                off = next((name for name in setup.off_points if name not in taken), None)
                if off is not None:  # the switched-off point, once, before the search
                    trial = study.ask(fixed_distributions={k: v for k, v in setup.distributions.items() if k != off})
                    trial.set_user_attr(OFF_ATTR, off)
                else:
                    if setup.seed is not None:
                        study.sampler = setup.sampler(offset=1000 * len(trials) + worker_index)
                    trial = study.ask(fixed_distributions=setup.distributions)
                trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
                return trial, False
            running = [t.number for t in trials if t.state == TrialState.RUNNING]
        if not running or not setup.heartbeats:
            return None, False
        if not announced:
            echo = setup.echo
            echo(f"[tune] all {setup.n_trials} trials started; waiting on running trial(s) {running}, "
                 f"taken over here if their worker stops")
            announced = True
        time.sleep(min(setup.heartbeat_s, 5.0))


def original_number(trial) -> int:
    """The number of the first trial of a retry series (its folder and MLflow run), else its own."""
    first = retried_from(trial)
    return trial.number if first is None else int(first)


def trial_params(trial) -> dict:
    """The trial's parameters as recorded (a switched-off parameter is shown as ``"disabled"``)."""
    params = dict(trial.params)
    off = trial.user_attrs.get(OFF_ATTR)
    if off:
        params[off] = "disabled"
    return params


def run_trial(setup: Setup, study, trial, echo: Callable[[str], None] = print) -> str:
    """Train one trial (resuming its folder if it was interrupted), evaluate it and tell Optuna; returns its state."""
    from optuna.trial import TrialState

    number, params = trial.number, trial_params(trial)
    first = original_number(study._storage.get_trial(trial._trial_id))
    run_dir = setup.folder / f"trial{first:04d}"  # a retry resumes the folder of the trial it retries
    _prepare_trial_folder(run_dir, setup.name, first, params, echo)
    config = setup.trial_config(dict(trial.params), off=trial.user_attrs.get(OFF_ATTR))
    tags = {PARENT_TAG: setup.parent_id, "fwpkm.role": "trial", "fwpkm.study": setup.name,
            "optuna.study": setup.name, "optuna.trial_number": str(number),
            "optuna.params": json.dumps(params, sort_keys=True, default=str)}
    tracking = dict(config.get("tracking") or {})
    tracking.update({"enabled": True, "uri": setup.store.uri, "experiment": setup.store.experiment,
                     "variant": f"trial{number}", "tags": {**(tracking.get("tags") or {}), **tags}})
    config["tracking"] = tracking
    config["run_dir"] = str(run_dir)
    if setup.prunes:  # the callback reports the validation loss, the study's one objective
        trainer = config.setdefault("trainer", {})
        callbacks = trainer.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        callbacks.append({"class_path": "ablations.tune.OptunaPruning",
                          "init_args": {"study_name": setup.name, "trial_id": int(trial._trial_id),
                                        "pruner": setup.pruner_spec, "run_dir": str(run_dir)}})
        trainer["callbacks"] = callbacks
    config_path = run_dir / CONFIG_FILE
    config_path.write_text("# written by `fwpkm tune`: the resolved config of this trial\n"
                           + dump_yaml(config))
    echo(f"[tune] trial {number} start: {json.dumps(params, default=str)}; log: {run_dir / LOG_FILE}")

    start = time.time()
    rc, tail = 0, ""
    if not (run_dir / PRUNED_FILE).is_file():  # pruned before its worker died: nothing left to train
        rc, tail = _train(run_dir, config_path, setup.trial_timeout, setup.storage_url, setup.threads)
    run_id = read_run_id(run_dir)
    if run_id:
        with contextlib.suppress(Exception):
            trial.set_user_attr("mlflow_run_id", run_id)
    frozen = study._storage.get_trial(trial._trial_id)
    client = setup.store.client
    values, metrics = None, {}
    if (run_dir / PRUNED_FILE).is_file():
        study.tell(trial, state=TrialState.PRUNED)
        state = "PRUNED"
    elif rc == 0:
        try:
            metrics = trial_metrics(setup, frozen, client, run_id, run_dir, config)
            values = [metrics[o["metric"]] for o in setup.objectives]
            if not all(math.isfinite(v) for v in values):
                raise RuntimeError(f"a non-finite objective value {values}")
            study.tell(trial, values if setup.multi else values[0])
            state = "COMPLETE"
        except (KeyError, RuntimeError) as err:
            missing = f"no {err.args[0]}" if isinstance(err, KeyError) else str(err)
            study.tell(trial, state=TrialState.FAIL)
            state, tail = "FAIL", f"training finished but the objective could not be measured: {missing}"
    else:
        study.tell(trial, state=TrialState.FAIL)
        state = "FAIL"
    error = None if state != "FAIL" else (failure_text(f"fwpkm train exited with {rc}", tail) if rc != 0 else tail)
    _record(setup, run_id, number, params, state, values, metrics, error, run_dir)
    shown = "" if values is None else " " + ", ".join(
        f"{o['metric']} {v:.4f}" for o, v in zip(setup.objectives, values))
    echo(f"[tune] trial {number} {state}{shown} in {time.time() - start:.1f} s"
         + (f": {error_line(error)}" if error else ""))
    return state


def trial_metrics(setup: Setup, frozen, client, run_id: Optional[str], run_dir: Path, config: dict) -> dict:
    """``val_loss`` and the metrics of the study's evaluations on the trial's last checkpoint."""
    metrics = {}
    loss = _final_value(frozen, client, run_id)
    if loss is not None:
        metrics[VAL_LOSS] = loss
    if setup.eval:
        with _torch_threads(setup.threads):
            for kind, options in setup.eval.items():
                try:
                    found, _ = EVALUATORS[kind](run_dir, options, config)
                except Exception as err:
                    raise RuntimeError(f"{kind} evaluation failed: {type(err).__name__}: {err}") from err
                metrics.update(found)
    return metrics


@contextlib.contextmanager
def _torch_threads(threads: Optional[int]):
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prepare_trial_folder(run_dir: Path, study: str, number: int, params: dict, echo) -> None:
    """A folder left by another study of the same name (storage deleted) is moved aside."""
    marker = run_dir / TRIAL_FILE
    identity = {"study": study, "trial": int(number), "params": json.loads(json.dumps(params, default=str))}
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError):
            old = {}
        if old != identity:
            target = run_dir.with_name(run_dir.name + f".old{int(time.time())}")
            run_dir.rename(target)
            echo(f"[tune] {run_dir} belonged to another trial; moved to {target}")
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(identity) + "\n")


def _train(run_dir: Path, config_path: Path, timeout: Optional[float], storage_url: str,
           threads: Optional[int] = None) -> tuple[Any, str]:
    return run_training(config_path, run_dir / LOG_FILE, child_env(threads, **{STORAGE_ENV: storage_url}), timeout)


def _final_value(frozen, client, run_id: Optional[str]) -> Optional[float]:
    """The objective: the validation loss reported at the last validation, else ln of MLflow's val/ppl."""
    if frozen.intermediate_values:
        value = frozen.intermediate_values[max(frozen.intermediate_values)]
        if math.isfinite(value):
            return float(value)
    if run_id:
        with contextlib.suppress(Exception):
            ppl = client.get_run(run_id).data.metrics.get("val/ppl")
            if ppl and ppl > 0:
                return math.log(ppl)
    return None


def _record(setup: Setup, run_id: Optional[str], number: int, params: dict, state: str,
            values: Optional[list], metrics: dict, error: Optional[str], run_dir: Path) -> None:
    client = setup.store.client
    tags = {PARENT_TAG: setup.parent_id, "fwpkm.role": "trial", "fwpkm.study": setup.name,
            "optuna.study": setup.name, "optuna.trial_number": str(number),
            "optuna.params": json.dumps(params, sort_keys=True, default=str), "optuna.state": state,
            "mlflow.runName": f"{setup.name}/trial{number}"}
    try:
        if run_id is None:  # training never got as far as creating its MLflow run
            existing = search_runs(setup.store, tag_filter(optuna__study=setup.name, optuna__trial_number=str(number)))
            run_id = existing[0].info.run_id if existing else client.create_run(
                setup.store.experiment_id, tags=tags, run_name=tags["mlflow.runName"]).info.run_id
        for k, v in tags.items():
            client.set_tag(run_id, k, v[:MAX_TAG])
        for k, v in metrics.items():
            if k != VAL_LOSS:
                client.log_metric(run_id, k, float(v))
        if values is not None:
            client.log_metric(run_id, "optuna/value", float(values[0]))
            if setup.multi:
                for o, v in zip(setup.objectives, values):
                    client.log_metric(run_id, f"optuna/value/{o['metric']}", float(v))
        if error:
            client.set_tag(run_id, "fwpkm.error", error[:MAX_TAG])
            with contextlib.suppress(Exception):
                client.log_artifact(run_id, str(run_dir / LOG_FILE))
        status = "FAILED" if state == "FAIL" else "FINISHED"
        if client.get_run(run_id).info.status != status:
            client.set_terminated(run_id, status)
    except Exception as err:
        print(f"[tune] warning: could not record trial {number} in MLflow: {type(err).__name__}: {err}",
              file=sys.stderr)


def worker(setup: Setup, worker_index: int = 0, deadline: Optional[float] = None,
           echo: Callable[[str], None] = print) -> int:
    """Claim and run trials until the study has ``n_trials`` (or the deadline passes); returns trials run."""
    study = setup.load(worker_index)
    done, failures = 0, 0
    while deadline is None or time.time() < deadline:
        trial, taken_over = claim(setup, study, worker_index)
        if trial is None:
            break
        if taken_over:
            first = original_number(study._storage.get_trial(trial._trial_id))
            echo(f"[tune] taking over trial {first} (its worker stopped) as trial {trial.number}; resuming it")
        beating = Heartbeat(setup.optuna_storage, trial._trial_id, setup.heartbeat_s) if setup.heartbeats else None
        with beating or contextlib.nullcontext():
            state = run_trial(setup, study, trial, echo)
        done += 1
        failures = failures + 1 if state == "FAIL" else 0
        if failures >= MAX_CONSECUTIVE_FAILURES:
            echo(f"[tune] worker {worker_index}: {failures} trials failed in a row; stopping (see their train.log)")
            break
    return done


# --------------------------------------------------------------------------- end of study


def finish(setup: Setup, echo: Callable[[str], None] = print) -> dict:
    """Best value (or Pareto front) and params, plots and the trial table, logged on the study's MLflow run."""
    from optuna.trial import TrialState

    from ablations import report

    study = setup.load()
    client = setup.store.client
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    echo(f"[tune] study {setup.name!r}: {len(trials)} trial(s): "
         + ", ".join(f"{n.lower()} {c}" for n, c in counts.items() if c))
    result: dict = {"study": study, "best": None}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        echo("[tune] no trial completed (all pruned or failed): no best value")
    elif setup.multi:
        front = sorted(study.best_trials, key=lambda t: t.number)
        best = front[report.recommended_index([t.values for t in front], setup.directions)]
        result.update(best=best, front=front)
        names = [o["metric"] for o in setup.objectives]
        for t in front:
            echo(f"[tune] Pareto trial {t.number}: " + ", ".join(f"{n} {v:.4f}" for n, v in zip(names, t.values))
                 + f"; params {json.dumps(trial_params(t), default=str)}")
        echo(f"[tune] recommended trial {best.number} (nearest the utopia point of the front): "
             f"params {json.dumps(trial_params(best), default=str)}")
        client.set_tag(setup.parent_id, "pareto.trials", ",".join(str(t.number) for t in front))
        for n, v in zip(names, best.values):
            client.log_metric(setup.parent_id, f"best/{n}", float(v))
        _log_best_params(client, setup.parent_id, best)
    else:
        best = study.best_trial
        result["best"] = best
        echo(f"[tune] best trial {best.number}: value {best.value:.4f}; params {json.dumps(best.params, default=str)}")
        client.log_metric(setup.parent_id, "best_value", float(best.value))
        _log_best_params(client, setup.parent_id, best)
    client.log_metric(setup.parent_id, "n_trials", float(len(trials)))
    rep = report.study_report(setup.store, setup.name, out_dir=setup.folder, log=True, echo=echo, optuna_study=study)
    result["report"] = rep
    echo(f"[tune] summary: {setup.folder / 'summary.md'} (table, plots beside it; MLflow run {setup.parent_id}); "
         f"again with: fwpkm report {setup.name}")
    look = browse_hint(setup.store.uri, setup.store.experiment_id, search=f"tags.`fwpkm.study` = '{setup.name}'")
    echo(f"[tune] compare the trials: {look}")
    if not any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
        client.set_terminated(setup.parent_id, "FINISHED")
    return result


def _log_best_params(client, run_id: str, best) -> None:
    client.log_metric(run_id, "best_trial", float(best.number))
    client.set_tag(run_id, "best.trial", str(best.number))
    for k, v in trial_params(best).items():
        client.set_tag(run_id, f"best.{k}"[:250], str(v))
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            client.log_metric(run_id, f"best/{k}"[:250], float(v))


# --------------------------------------------------------------------------- entry point


def tune(grid_name: str, study_name: Optional[str] = None, storage: Optional[str] = None,
         n_trials: Optional[int] = None, workers: int = 1, timeout: Optional[float] = None,
         trial_timeout: Optional[float] = None, seed: Optional[int] = None, runs_dir: str = "runs",
         tracking_uri: Optional[str] = None, sets: Optional[dict] = None, worker_only: bool = False,
         argv: Optional[list] = None, heartbeat_s: float = HEARTBEAT_S, echo: Callable[[str], None] = print) -> int:
    setup = Setup(grid_name, study_name, storage, n_trials, runs_dir, tracking_uri, sets, seed, trial_timeout,
                  heartbeat_s, echo)
    setup.check()
    share = int(os.environ.get("FWPKM_TUNE_WORKERS", "0")) if worker_only else workers
    if share > 1:  # the workers of this machine split its cores
        setup.threads = threads_per_worker(share)
    setup.store = open_store(setup.runs_dir, setup.grid.experiment, tracking_uri)
    study = setup.load()
    setup.parent_id = study_parent(setup, study)
    set_running(setup.store, setup.parent_id)
    deadline = None if timeout is None else time.time() + timeout
    if not worker_only:
        echo(f"[tune] study {setup.name!r} in {public_url(setup.storage_url)}: {setup.n_trials} trial(s) in total, "
             f"{max(1, workers)} worker(s) here; params {sorted(setup.distributions)}; MLflow run {setup.parent_id}")
        echo(f"[tune] dashboard: optuna-dashboard {public_url(setup.storage_url)}")
    children = []
    if workers > 1 and not worker_only:
        for i in range(1, workers):
            cmd = [sys.executable, "-m", "ablations", "tune", *(_worker_argv(argv or [], i)), "--worker"]
            env = child_env()
            env["FWPKM_TUNE_WORKER_INDEX"] = str(i)
            env["FWPKM_TUNE_WORKERS"] = str(workers)
            children.append(subprocess.Popen(cmd, env=env, cwd=os.getcwd()))
    index = int(os.environ.get("FWPKM_TUNE_WORKER_INDEX", "0")) if worker_only else 0
    try:
        worker(setup, index, deadline, echo)
    except KeyboardInterrupt:
        for proc in children:
            stop(proc)
        echo("[tune] interrupted: run the same command again to resume the study")
        return 130
    finally:
        for proc in children:
            with contextlib.suppress(Exception):
                proc.wait()
    if worker_only:
        return 0
    try:
        finish(setup, echo)
    except Exception as err:
        echo(f"[tune] warning: the end-of-study report failed: {type(err).__name__}: {err}")
        traceback.print_exc()
        return 1
    return 0


def _worker_argv(argv: list, index: int) -> list:
    """The parent's arguments without --workers (a worker runs one loop; it offsets --seed by its index)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers=") or arg == "--worker":
            continue
        out.append(arg)
    return out
