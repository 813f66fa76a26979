"""``fwpkm ablate GRID``: run every (variant, seed) of a grid, tracked in MLflow.

Each run is a ``fwpkm train`` subprocess (crash isolation; ``--workers N`` of them at a time,
or one per GPU with ``--gpus``) started with ``--config <run folder>/grid_config.yaml``, the
resolved config of the run, in ``<runs>/ablations/<grid>/<variant>/seed<k>/``. Its MLflow run
is tagged ``fwpkm.grid``, ``fwpkm.variant``, ``fwpkm.seed``, ``fwpkm.config_hash`` and nested
under the grid's parent run (tag ``fwpkm.parent_run``, not MLflow's nesting, which its UI folds); the parent is found again by its
tags, so every invocation of the same grid adds to the same parent.

* A run whose MLflow run is FINISHED with the same config hash (and evaluated) is skipped.
  One evaluated with another ``eval`` config than the grid's (tag ``fwpkm.evaluated_with``) is
  evaluated again without training; metrics of the cells both configs share are overwritten.
* An interrupted run (runner or machine killed) is started again on the same run folder:
  ``fwpkm train`` resumes from ``last.ckpt`` and logs into the same MLflow run.
* A run that fails (invalid config, crash, timeout) is recorded as a FAILED MLflow run with
  its error (tag ``fwpkm.error``, log as artifact); the other runs go on. A FAILED run is tried
  again by the next invocation.
* After training: the parameter count, and the NIAH accuracy when the grid has ``eval.niah``
  (final checkpoint, ``lit.evaluation.niah``), are logged on the run; tag ``fwpkm.stage=done``.
* At the end :mod:`ablations.report` builds the summary table (printed, CSV, Markdown, plot)
  from the MLflow store and attaches it to the parent run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import signal
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


from ablations.grid import Grid, GridError, RunSpec, describe, grid_dir, load_grid, resolve_runs
from ablations.storage import public_url
from ablations.launch import CONFIG_FILE, LOG_FILE, ProcessGroup, child_env, error_line, failure_text, run_training
from lit.config import dump_yaml
from lit.evaluation import mqar, niah, ppl
from lit.module import model_costs
from lit.tracking import (PARENT_TAG, FolderLockedError, Store, browse_hint, ensure_parent, exclusive_lock,
                          open_store, read_run_id, search_runs, set_running, set_shared_tag, tag_filter)

STATE_FILE = "ablation.json"
ROLE_GRID, ROLE_RUN = "grid", "grid-run"
MAX_TAG = 5000
EVALUATED_WITH = "fwpkm.evaluated_with"  # tag: the eval config a finished run was evaluated with
# a grid's eval.<name>: (run_dir, options, config, gpu) -> (metrics, csv path)
EVALUATORS = {"niah": niah.evaluate_run, "mqar": mqar.evaluate_run, "ppl": ppl.evaluate_run}


# --------------------------------------------------------------------------- the grid runner


@dataclass
class Outcome:
    spec: RunSpec
    status: str  # FINISHED | SKIPPED | FAILED
    run_id: Optional[str] = None
    seconds: float = 0.0
    error: Optional[str] = None
    value: Optional[float] = None  # the final validation loss, ln(val/ppl)


class GridRunner:
    def __init__(self, grid: Grid, specs: list[RunSpec], store: Store, workers: int = 1,
                 gpus: Optional[list[str]] = None, timeout: Optional[float] = None,
                 echo: Callable[[str], None] = print, cell_queue=None):
        self.grid, self.specs, self.store = grid, specs, store
        self.cell_queue = cell_queue  # ablations.cellqueue.CellQueue: cells shared with other machines
        self.gpus = list(gpus or [])
        self.workers = max(1, int(workers or (len(self.gpus) or 1)))
        self.timeout = timeout
        self.echo = echo
        self.parent_id: Optional[str] = None
        self._procs = ProcessGroup()
        self._stopping = threading.Event()
        self._gpu_slots: "queue.Queue[str]" = queue.Queue()
        for gpu in self.gpus:
            self._gpu_slots.put(gpu)

    # ----------------------------------------------------------------- top level

    def run(self) -> list[Outcome]:
        grid = self.grid
        client = self.store.client
        todo = self._skip_finished()
        if self.cell_queue is None:
            self.parent_id = ensure_parent(self.store, ROLE_GRID, grid.name)
        else:  # the queue's creator makes the parent run and fills the queue before the others look
            def make_parent() -> str:
                parent = ensure_parent(self.store, ROLE_GRID, grid.name)
                self.cell_queue.fill([s for s in todo if s.error is None])
                return parent

            self.parent_id = self.cell_queue.share("mlflow_parent_run", make_parent)
            added = self.cell_queue.fill([s for s in todo if s.error is None])
            self.echo(f"[ablate] queue {self.cell_queue.name!r} on {public_url(self.cell_queue.url)}"
                      f"{': created' if self.cell_queue.leader else ''}{f', {added} cell(s) added' if added else ''}")
        set_running(self.store, self.parent_id)
        tags = {"fwpkm.variants": json.dumps(grid.order), "fwpkm.aliases": json.dumps(grid.aliases),
                "fwpkm.eval": self.eval_signature, "fwpkm.grid_file": str(grid.path),
                "fwpkm.seeds": json.dumps(sorted({s.seed for s in self.specs} | set(grid.seeds)))}
        for k, v in tags.items():
            set_shared_tag(client, self.parent_id, k, v[:MAX_TAG])
        out_dir = grid_dir(self.store.runs_dir, grid.name)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "grid.yaml").write_text(dump_yaml(grid.to_dict()))
        with contextlib.suppress(Exception):
            client.log_artifact(self.parent_id, str(out_dir / "grid.yaml"))
        self.echo(f"[ablate] grid {grid.name!r}: {len(self.specs)} run(s), {self.workers} worker(s); "
                  f"MLflow parent run {self.parent_id} ({self.store.uri}, experiment {self.store.experiment!r})")

        outcomes: list[Outcome] = list(self._skipped)
        for spec in todo:
            if spec.error is not None:
                outcomes.append(self._record_failure(spec, f"invalid config: {spec.error}", seconds=0.0))
        todo = [s for s in todo if s.error is None]

        previous = _install_sigterm()
        try:
            with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ablate") as pool:
                if self.cell_queue is None:
                    futures = [pool.submit(self._execute, spec) for spec in todo]
                else:
                    futures = [pool.submit(self._queue_worker) for _ in range(self.workers)]
                try:
                    for future in as_completed(futures):
                        result = future.result()
                        outcomes.extend(result if isinstance(result, list) else [result])
                except BaseException:
                    self._stopping.set()
                    for f in futures:
                        f.cancel()
                    self._procs.stop_all()
                    raise
        except BaseException:
            with contextlib.suppress(Exception):
                client.set_terminated(self.parent_id, "KILLED")
            raise
        finally:
            _restore_sigterm(previous)
        order = {id(s): i for i, s in enumerate(self.specs)}
        outcomes.sort(key=lambda o: order.get(id(o.spec), 0))
        return outcomes

    def _skip_finished(self) -> list[RunSpec]:
        """The specs still to run; the finished and evaluated ones are noted in ``self._skipped``."""
        self._skipped, todo = [], []
        for spec in self.specs:
            done = self.finished_run(spec) if spec.error is None else None
            if done is not None and done.data.tags.get("fwpkm.stage") == "done":
                if done.data.tags.get(EVALUATED_WITH) == self.eval_signature:
                    self.echo(f"[ablate] skip {spec.key}: MLflow run {done.info.run_id} already FINISHED "
                              f"(hash {spec.config_hash})")
                    self._skipped.append(Outcome(spec, "SKIPPED", done.info.run_id))
                    continue
                self.echo(f"[ablate] re-evaluate {spec.key}: trained (MLflow run {done.info.run_id}), "
                          f"evaluated with another eval config than the grid's")
            todo.append(spec)
        return todo

    def _queue_worker(self) -> list[Outcome]:
        """Take cells from the shared queue and run them until it is empty (one thread of ``--workers``)."""
        from ablations.cellqueue import cell_id

        by_cell = {cell_id(s): s for s in self.specs if s.error is None}
        outcomes: list[Outcome] = []
        while not self._stopping.is_set():
            trial = self.cell_queue.take(self._stopping)
            if trial is None:
                break
            spec = by_cell[trial.user_attrs["cell"]]
            outcome = Outcome(spec, "FAILED", error="interrupted")
            try:
                with self.cell_queue.heartbeat(trial):
                    retried = self.cell_queue.retried_from(trial)
                    if retried is not None:
                        self.echo(f"[ablate] taking over {spec.key} (queue trial {retried}: its worker stopped)")
                        self._close_dead_runs(spec)
                    done = self.finished_run(spec)
                    if (done is not None and done.data.tags.get("fwpkm.stage") == "done"
                            and done.data.tags.get(EVALUATED_WITH) == self.eval_signature):
                        outcome = Outcome(spec, "SKIPPED", done.info.run_id, value=val_loss(done))
                    else:
                        outcome = self._execute(spec)
            finally:
                if outcome.error == "interrupted":  # back in the queue at once, for any worker
                    self.cell_queue.finish(trial, "FAILED", None, outcome.run_id)
                    self.cell_queue.fill([spec])
                else:
                    self.cell_queue.finish(trial, outcome.status, outcome.value, outcome.run_id)
                    if outcome.run_id:
                        with contextlib.suppress(Exception):
                            self.store.client.set_tag(outcome.run_id, "fwpkm.queue_trial", str(trial.number))
            outcomes.append(outcome)
        return outcomes

    def _close_dead_runs(self, spec: RunSpec) -> None:
        """A taken-over cell whose run folder is not shared trains again in a new MLflow run: the dead
        worker's run, still RUNNING, is marked KILLED so that the cell has one live run."""
        own = read_run_id(spec.run_dir)
        for run in self._cell_runs(spec):
            if run.info.status == "RUNNING" and run.info.run_id != own:
                self.store.client.set_tag(run.info.run_id, "fwpkm.stage", "taken_over")
                self.store.client.set_terminated(run.info.run_id, "KILLED")

    def _cell_runs(self, spec: RunSpec) -> list:
        return search_runs(self.store, tag_filter(fwpkm__grid=spec.grid, fwpkm__variant=spec.variant,
                                                  fwpkm__seed=str(spec.seed), fwpkm__config_hash=spec.config_hash))

    def finished_run(self, spec: RunSpec):
        runs = self._cell_runs(spec)
        finished = [r for r in runs if r.info.status == "FINISHED"]
        finished.sort(key=lambda r: (r.data.tags.get("fwpkm.stage") == "done", r.info.start_time or 0))
        return finished[-1] if finished else None

    # ----------------------------------------------------------------- one run

    def _execute(self, spec: RunSpec) -> Outcome:
        """One run, with its folder locked against other runners for the whole run (training, evaluation)."""
        try:
            with exclusive_lock(runner_lock_path(spec.run_dir), f"grid run {spec.key} ({spec.run_dir})"):
                return self._execute_locked(spec)
        except FolderLockedError as err:
            self.echo(f"[ablate] not started {spec.key}: {err}")
            return Outcome(spec, "FAILED", error=str(err))

    def _execute_locked(self, spec: RunSpec) -> Outcome:
        start = time.time()
        gpu = self._gpu_slots.get() if self.gpus else None
        try:
            if self._stopping.is_set():
                return Outcome(spec, "FAILED", error="interrupted")
            done = self.finished_run(spec)  # trained but not evaluated: only finish it
            if done is not None:
                return self._finalize(spec, done.info.run_id, start, gpu)
            self._prepare_folder(spec)
            run_id = read_run_id(spec.run_dir)
            if run_id:
                with contextlib.suppress(Exception):
                    self.store.client.set_tag(run_id, "fwpkm.stage", "training")
            config_path = self._write_config(spec, gpu)
            rc, log_tail = self._train(spec, config_path, gpu)
            run_id = read_run_id(spec.run_dir)
            if rc != 0:
                if self._stopping.is_set():
                    return Outcome(spec, "FAILED", run_id, time.time() - start, "interrupted")
                reason = "timed out" if rc == "timeout" else f"fwpkm train exited with code {rc}"
                return self._record_failure(spec, failure_text(reason, log_tail), time.time() - start, run_id)
            if not run_id:
                return self._record_failure(spec, "training finished but left no MLflow run id in the run folder",
                                            time.time() - start)
            return self._finalize(spec, run_id, start, gpu)
        except Exception as err:  # the runner's own bug must not take the other runs down
            return self._record_failure(spec, f"runner error: {type(err).__name__}: {err}\n{traceback.format_exc()}",
                                        time.time() - start, read_run_id(spec.run_dir))
        finally:
            if gpu is not None:
                self._gpu_slots.put(gpu)

    def _prepare_folder(self, spec: RunSpec) -> None:
        """A run folder of another model/data/seed (the grid changed) is moved aside, so that the new
        run does not try to resume a checkpoint of a different model."""
        state_path = spec.run_dir / STATE_FILE
        if state_path.is_file():
            try:
                state = json.loads(state_path.read_text())
            except (OSError, ValueError):
                state = {}
            if state.get("experiment_hash") not in (None, spec.experiment_hash):
                target = spec.run_dir.with_name(f"{spec.run_dir.name}.{state.get('config_hash', 'old')}")
                n = 1
                while target.exists():
                    target = spec.run_dir.with_name(f"{spec.run_dir.name}.{state.get('config_hash', 'old')}.{n}")
                    n += 1
                spec.run_dir.rename(target)
                self.echo(f"[ablate] {spec.key}: the grid changed this run's model/data; previous run folder "
                          f"moved to {target}")
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps({"grid": spec.grid, "variant": spec.variant, "seed": spec.seed,
                                          "config_hash": spec.config_hash,
                                          "experiment_hash": spec.experiment_hash}, indent=1) + "\n")

    @property
    def eval_signature(self) -> str:
        """The grid's eval config as text: a finished run evaluated with another one is re-evaluated."""
        return json.dumps(self.grid.eval, sort_keys=True)[:MAX_TAG]

    def run_tags(self, spec: RunSpec) -> dict:
        return {PARENT_TAG: self.parent_id, "fwpkm.role": ROLE_RUN, "fwpkm.grid": spec.grid,
                "fwpkm.variant": spec.variant, "fwpkm.seed": str(spec.seed), "fwpkm.config_hash": spec.config_hash,
                "fwpkm.stage": "training"}

    def _write_config(self, spec: RunSpec, gpu: Optional[str]) -> Path:
        config = json.loads(json.dumps(spec.config))
        tracking = dict(config.get("tracking") or {})
        user_tags = dict(tracking.get("tags") or {})
        tracking.update({"enabled": True, "uri": self.store.uri, "experiment": self.store.experiment,
                         "variant": spec.variant, "tags": {**user_tags, **self.run_tags(spec)}})
        config["tracking"] = tracking
        config["run_dir"] = str(spec.run_dir)
        if gpu is not None:  # one variant per GPU
            trainer = config.setdefault("trainer", {})
            trainer.update({"accelerator": "gpu", "devices": 1, "strategy": "auto"})
        path = spec.run_dir / CONFIG_FILE
        path.write_text("# written by `fwpkm ablate`: the resolved config of this run\n"
                        + dump_yaml(config))
        return path

    def _train(self, spec: RunSpec, config_path: Path, gpu: Optional[str]):
        env = child_env(threads=threads_per_worker(self.workers) if gpu is None else None)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = physical_gpu(gpu)
        log_path = spec.run_dir / LOG_FILE
        self.echo(f"[ablate] start {spec.key} (hash {spec.config_hash}{', GPU ' + gpu if gpu else ''}); "
                  f"log: {log_path}")
        return run_training(config_path, log_path, env, self.timeout, self._procs)

    # ----------------------------------------------------------------- after training

    def _finalize(self, spec: RunSpec, run_id: str, start: float, gpu: Optional[str]) -> Outcome:
        client = self.store.client
        client.set_tag(run_id, "mlflow.runName", spec.key)
        for k, v in self.run_tags(spec).items():
            if k != "fwpkm.stage":
                client.set_tag(run_id, k, v)
        try:
            context = int((spec.config.get("data") or {}).get("seq_len", 256))
            for k, v in model_costs(spec.run_dir, context).items():
                client.log_metric(run_id, k, v)
            for kind, evaluate in EVALUATORS.items():
                if self.grid.eval.get(kind):
                    self.echo(f"[ablate] {kind} {spec.key}")
                    metrics, csv_path = evaluate(spec.run_dir, self.grid.eval[kind], spec.config, gpu)
                    for k, v in metrics.items():
                        client.log_metric(run_id, k, v)
                    client.log_artifact(run_id, str(csv_path))
        except Exception as err:
            message = f"evaluation after training failed: {type(err).__name__}: {err}"
            client.set_tag(run_id, "fwpkm.error", (message + "\n" + traceback.format_exc())[:MAX_TAG])
            client.set_tag(run_id, "fwpkm.stage", "failed")
            client.set_terminated(run_id, "FAILED")
            self.echo(f"[ablate] FAILED {spec.key}: {message}")
            return Outcome(spec, "FAILED", run_id, time.time() - start, message)
        client.set_tag(run_id, EVALUATED_WITH, self.eval_signature)
        client.set_tag(run_id, "fwpkm.stage", "done")
        run = client.get_run(run_id)
        if run.info.status != "FINISHED":
            client.set_terminated(run_id, "FINISHED")
        ppl = run.data.metrics.get("val/ppl")
        note = f"val/ppl={ppl:.3f}" if ppl is not None else "no val/ppl"
        self.echo(f"[ablate] done {spec.key} in {time.time() - start:.1f} s: {note} (MLflow run {run_id})")
        return Outcome(spec, "FINISHED", run_id, time.time() - start, value=val_loss(run))

    def _record_failure(self, spec: RunSpec, error: str, seconds: float, run_id: Optional[str] = None) -> Outcome:
        """Mark the run's MLflow run FAILED with the error; create one if training never got that far."""
        client = self.store.client
        try:
            if run_id:
                with contextlib.suppress(Exception):
                    client.get_run(run_id)
                    client.set_tag(run_id, "mlflow.runName", spec.key)
                    for k, v in self.run_tags(spec).items():
                        client.set_tag(run_id, k, v)
                    client.set_tag(run_id, "fwpkm.stage", "failed")
                    client.set_tag(run_id, "fwpkm.error", error[:MAX_TAG])
                    client.set_terminated(run_id, "FAILED")
                    self._log_file(run_id, spec.run_dir / LOG_FILE)
                    return self._failed(spec, run_id, seconds, error)
            orphans = [r for r in search_runs(self.store, tag_filter(
                fwpkm__grid=spec.grid, fwpkm__variant=spec.variant, fwpkm__seed=str(spec.seed),
                fwpkm__config_hash=spec.config_hash, fwpkm__orphan="1"))]
            tags = {**self.run_tags(spec), "fwpkm.stage": "failed", "fwpkm.orphan": "1",
                    "fwpkm.error": error[:MAX_TAG], "variant": spec.variant, "seed": str(spec.seed),
                    "mlflow.runName": spec.key}
            if orphans:
                run_id = orphans[0].info.run_id
                client.update_run(run_id, status="RUNNING")
                for k, v in tags.items():
                    client.set_tag(run_id, k, v)
            else:
                run_id = client.create_run(self.store.experiment_id, tags=tags, run_name=spec.key).info.run_id
            self._log_file(run_id, spec.run_dir / LOG_FILE)
            client.set_terminated(run_id, "FAILED")
        except Exception as err:  # the store itself failing: still report the run as failed
            error += f"\n(and recording the failure in MLflow failed: {type(err).__name__}: {err})"
        return self._failed(spec, run_id, seconds, error)

    def _failed(self, spec, run_id, seconds, error) -> Outcome:
        self.echo(f"[ablate] FAILED {spec.key}: {error_line(error)}")
        return Outcome(spec, "FAILED", run_id, seconds, error)

    def _log_file(self, run_id: str, path: Path) -> None:
        if path.is_file():
            with contextlib.suppress(Exception):
                self.store.client.log_artifact(run_id, str(path))


# --------------------------------------------------------------------------- helpers


def grid_search(name: str) -> str:
    """MLflow's search filter for a grid's runs (and its summary run)."""
    return f"tags.`fwpkm.grid` = '{name}'"


def val_loss(run) -> Optional[float]:
    ppl = run.data.metrics.get("val/ppl")
    return math.log(ppl) if ppl and ppl > 0 else None


def runner_lock_path(run_dir: Path) -> Path:
    """The lock a grid runner holds on one (variant, seed) while it trains and evaluates it."""
    return run_dir.parent / f".{run_dir.name}.runner.lock"


def physical_gpu(gpu: str) -> str:
    """``--gpus`` indexes the GPUs this process sees; a child gets the matching entry of the
    runner's own CUDA_VISIBLE_DEVICES (if any) as its only device."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and str(gpu).isdigit() and int(gpu) < len(visible):
        return visible[int(gpu)]
    return str(gpu)


def threads_per_worker(workers: int) -> int:
    """CPU threads for each of ``workers`` jobs sharing this machine."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _install_sigterm():
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- entry point


def ablate(grid_name: str, runs_dir: str = "runs", tracking_uri: Optional[str] = None, only=None, seeds=None,
           workers: int = 1, gpus: Optional[list[str]] = None, sets: Optional[dict] = None, dry_run: bool = False,
           timeout: Optional[float] = None, storage: Optional[str] = None, heartbeat_s: float = 60.0,
           echo: Callable[[str], None] = print) -> int:
    """Run (or with ``dry_run`` list) a grid; returns the exit code (1 if any run failed). With ``storage``
    (an Optuna RDB URL) the grid's cells are a queue shared with ``ablate`` processes elsewhere."""
    from ablations import report

    grid = load_grid(grid_name)
    specs = resolve_runs(grid, Path(runs_dir), only=only, seeds=seeds, sets=sets)
    errors = {s.error for s in specs}
    if sets and specs and len(errors) == 1 and None not in errors:  # the --set breaks every run: one line, exit 2
        given = " ".join(f"--set {k}={v}" for k, v in sets.items())
        raise GridError(f"{given}: {errors.pop().removeprefix('ConfigError: ')}")
    if dry_run:
        echo(describe(grid, specs))
        return 0 if all(s.error is None for s in specs) else 1
    store = open_store(Path(runs_dir), grid.experiment, tracking_uri)
    cell_queue = None
    if storage:
        from ablations.cellqueue import CellQueue, cell_id

        cell_queue = CellQueue(storage, grid.name, [cell_id(s) for s in specs], heartbeat_s=heartbeat_s, echo=echo)
    runner = GridRunner(grid, specs, store, workers=workers, gpus=gpus, timeout=timeout, echo=echo,
                        cell_queue=cell_queue)
    try:
        outcomes = runner.run()
    except KeyboardInterrupt:
        echo("[ablate] interrupted: running trainings were stopped; run the same command again to resume them")
        return 130
    result = report.grid_report(store, grid.name, out_dir=grid_dir(store.runs_dir, grid.name), log=True, echo=echo)
    client = store.client
    failed = [o for o in outcomes if o.status == "FAILED"]
    set_shared_tag(client, runner.parent_id, "fwpkm.failed_runs", json.dumps([o.spec.key for o in failed])[:MAX_TAG])
    client.set_terminated(runner.parent_id, "FINISHED")
    counts = {s: sum(o.status == s for o in outcomes) for s in ("FINISHED", "SKIPPED", "FAILED")}
    echo(f"[ablate] grid {grid.name!r}: {counts['FINISHED']} trained, {counts['SKIPPED']} skipped (already finished), "
         f"{counts['FAILED']} failed; summary in {result.get('files', {}).get('md', '-')}")
    echo(f"[ablate] tables and plots: {grid_dir(store.runs_dir, grid.name)}; again with: fwpkm report {grid.name}")
    echo(f"[ablate] compare the runs: {browse_hint(store.uri, store.experiment_id, search=grid_search(grid.name))}")
    for o in failed:
        echo(f"[ablate]   FAILED {o.spec.key}: {error_line(o.error or '')}")
    return 1 if failed else 0

