"""A grid's (variant, seed) cells as a queue that any number of ``fwpkm ablate`` processes, on any
machines, share through an Optuna RDB storage (PostgreSQL, MySQL, or SQLite on one machine).

Each cell is an Optuna trial of the study ``grid:<grid>:<cells hash>`` (one study per set of cells,
so two commands with other ``--only``/``--seeds``/``--set`` never mix): enqueued WAITING with the
user attributes ``cell`` (``variant/seed<k>@<config hash>``) and ``key``, popped by ``study.ask()``
(the storage switches a trial to RUNNING atomically, so one worker gets it), and told COMPLETE
(value: the final validation loss), FAIL, or PRUNED when it turned out to be a duplicate.

Optuna's own machinery replaces hand-written claiming: the storage records a heartbeat for each
running cell (:class:`Heartbeat`, through ``RDBStorage.record_heartbeat``); every worker calls
``optuna.storages.fail_stale_trials`` before taking a cell, which fails the cells whose worker died
(no heartbeat for ``grace`` seconds) and, through Optuna's ``RetryHeartbeatStaleTrialCallback``,
enqueues each again with its user attributes. A worker that takes such a retry resumes the run from
its checkpoint when the run folder is shared, or trains it again when it is not.

Duplicates: workers that start together on a new study may enqueue a cell twice; a popped trial
yields (PRUNED, user attribute ``duplicate_of``) when its cell is COMPLETE, or WAITING / RUNNING in
a trial with a lower number, so each cell trains once. A worker stops when nothing is WAITING and
no other cell is RUNNING (it waits on running ones, which may still go stale and come back).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from typing import Callable, Optional

from ablations.storage import HEARTBEAT_S, Heartbeat, heartbeat_storage, retried_from

CELL, KEY, DUPLICATE_OF = "cell", "key", "duplicate_of"
LEADER_WAIT_S = 300.0


def cell_id(spec) -> str:
    return f"{spec.key}@{spec.config_hash}"


def study_name(grid_name: str, cells: list[str]) -> str:
    digest = hashlib.sha1(json.dumps(sorted(cells)).encode()).hexdigest()[:10]
    return f"grid:{grid_name}:{digest}"


class CellQueue:
    """The shared queue of one grid invocation's cells (see the module docstring)."""

    def __init__(self, url: str, grid_name: str, cells: list[str], heartbeat_s: float = HEARTBEAT_S,
                 echo: Callable[[str], None] = print):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url, self.heartbeat_s, self.echo = url, heartbeat_s, echo
        self.storage = heartbeat_storage(url, heartbeat_s)
        self.name = study_name(grid_name, cells)
        self.leader = False
        try:
            self.study = optuna.create_study(study_name=self.name, storage=self.storage, direction="minimize",
                                             sampler=optuna.samplers.RandomSampler(seed=0))
            self.leader = True  # this worker created the queue: it fills it first
        except optuna.exceptions.DuplicatedStudyError:
            self.study = optuna.load_study(study_name=self.name, storage=self.storage,
                                           sampler=optuna.samplers.RandomSampler(seed=0))

    # ----------------------------------------------------------------- filling

    def share(self, attr: str, make: Callable[[], str]) -> str:
        """A value the leader makes once (e.g. the grid's MLflow parent run) and every worker reads."""
        if self.leader:
            value = make()
            self.study.set_user_attr(attr, value)
            return value
        deadline = time.time() + LEADER_WAIT_S
        while time.time() < deadline:
            value = self.study.user_attrs.get(attr)
            if value:
                return value
            time.sleep(0.5)
        value = make()  # the leader died before sharing it
        self.study.set_user_attr(attr, value)
        return value

    def fill(self, specs: list) -> int:
        """Enqueue each cell that has no WAITING, RUNNING or COMPLETE trial; returns how many."""
        from optuna.trial import TrialState

        live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
        present = {t.user_attrs.get(CELL) for t in self.study.get_trials(deepcopy=False, states=live)}
        added = 0
        for spec in specs:
            if cell_id(spec) not in present:
                self.study.enqueue_trial({}, user_attrs={CELL: cell_id(spec), KEY: spec.key})
                added += 1
        return added

    # ----------------------------------------------------------------- taking

    def take(self, stopping: Optional[threading.Event] = None):
        """The next cell's trial (RUNNING, owned by this worker), or None when the grid is done."""
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        announced = False
        while stopping is None or not stopping.is_set():
            fail_stale_trials(self.study)
            trials = self.study.get_trials(deepcopy=False)
            if not any(t.state == TrialState.WAITING for t in trials):
                running = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get(CELL)]
                if not running:
                    return None
                if not announced:
                    self.echo(f"[ablate] queue {self.name}: nothing waiting; {len(running)} cell(s) running "
                              f"elsewhere, taken over here if their worker stops")
                    announced = True
                time.sleep(min(self.heartbeat_s, 5.0))
                continue
            trial = self.study.ask()
            cell = trial.user_attrs.get(CELL)
            if cell is None:  # another worker took the last waiting cell between the look and the ask
                trial.set_user_attr("note", "not a cell: asked after the queue emptied")
                self.study.tell(trial, state=TrialState.FAIL)
                continue
            first = self._first_of(cell, trial.number)
            if first is not None:
                trial.set_user_attr(DUPLICATE_OF, first)
                self.study.tell(trial, state=TrialState.PRUNED)
                continue
            trial.set_user_attr("worker", {"host": socket.gethostname(), "started": time.time()})
            return trial
        return None

    def _first_of(self, cell: str, number: int) -> Optional[int]:
        """The trial this one duplicates: the cell COMPLETE, or WAITING/RUNNING with a lower number."""
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False):
            if t.number == number or t.user_attrs.get(CELL) != cell:
                continue
            if t.state == TrialState.COMPLETE or (t.state in (TrialState.WAITING, TrialState.RUNNING)
                                                  and t.number < number):
                return t.number
        return None

    def heartbeat(self, trial) -> Heartbeat:
        return Heartbeat(self.storage, trial._trial_id, self.heartbeat_s)

    def retried_from(self, trial) -> Optional[int]:
        """The number of the trial (of a dead worker) this one retries, if any."""
        return retried_from(self.storage.get_trial(trial._trial_id))

    def finish(self, trial, status: str, value: Optional[float], run_id: Optional[str]) -> None:
        from optuna.trial import TrialState

        if run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
        if status in ("FINISHED", "SKIPPED"):
            self.study.tell(trial, value if value is not None and value == value else 0.0)
        else:
            self.study.tell(trial, state=TrialState.FAIL)
