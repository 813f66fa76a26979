"""MLflow tracking: where runs are stored, what each run records, and how a resumed run
finds its MLflow run again.

Store. Without ``MLFLOW_TRACKING_URI`` (or ``--tracking.uri``) runs go to a local SQLite
database in the runs folder (the parent of the run folder, ``runs/`` by default):
``sqlite:///<runs>/mlflow.db``, with artifacts in ``<runs>/mlartifacts``. MLflow 3
recommends a database backend over the file store (``mlruns/``); SQLite needs only
SQLAlchemy and Alembic, which mlflow-skinny installs. Browse it with::

    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db

(``mlflow ui`` needs the full ``mlflow`` package; mlflow-skinny only logs). Point
``MLFLOW_TRACKING_URI`` at a team server (``http://host:5000``) to log there instead.

Each run records: the full flattened config as params (``trainer.*``, ``model.*`` including
the resolved model config under ``model.config.*``, ``data.*``, ...), tags (preset,
variant, seed, git commit, run folder), per-step metrics, and as artifacts the resolved
config files and the periodic plots.

Resume. The MLflow run id is written to ``<run_dir>/mlflow_run_id``; re-running the same
command reads it and keeps logging into the same run.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from fwpkm.config import ConfigError
from lit.config import TrackingConfig, leaves

RUN_ID_FILE = "mlflow_run_id"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_tracking_uri(runs_folder: Path) -> str:
    return f"sqlite:///{Path(runs_folder).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(uri: Optional[str], runs_folder: Path) -> tuple[str, Optional[str]]:
    """(tracking URI, artifact location for a new experiment): ``uri``, else ``$MLFLOW_TRACKING_URI``,
    else ``sqlite:///<runs folder>/mlflow.db``; artifacts beside a SQLite database in ``mlartifacts/``,
    None (the server decides) elsewhere."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        runs_folder = Path(runs_folder).resolve()
        runs_folder.mkdir(parents=True, exist_ok=True)
        uri = default_tracking_uri(runs_folder)
    if uri.startswith("sqlite:///"):
        return uri, (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return uri, None


def git_commit(root: Path = PROJECT_ROOT) -> str:
    """The checked-out commit, read from ``.git`` directly (no git executable needed); "unknown" if none."""
    git = root / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        for base in (git, _common_dir(git)):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split(" ", 1)[0]
    except (OSError, IndexError):
        pass
    return "unknown"


def _common_dir(git: Path) -> Path:
    common = git / "commondir"
    return (git / common.read_text().strip()).resolve() if common.is_file() else git


def read_run_id(run_dir: Path) -> Optional[str]:
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file():
        text = path.read_text().strip()
        return text or None
    return None


def store_lock(uri: str):
    """An exclusive lock on a SQLite store while it may be created: runs (or DDP ranks) started
    together on a fresh ``mlflow.db`` would otherwise race on creating its tables."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    return file_lock(db.with_name(db.name + ".lock"))


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the kind MLflow 3 records (3.17 UI still needs ?workflowType)


def ensure_experiment(uri: str, experiment: str, artifact_location: Optional[str]) -> None:
    """Create the store's tables and the experiment if missing (call under :func:`store_lock`), marked
    as model training (MLflow 3.17's UI still opens on GenAI pages without ``?workflowType``: browse_hint)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            client.create_experiment(experiment, artifact_location=artifact_location, tags=dict([EXPERIMENT_KIND]))
        except MlflowException:  # created meanwhile by another process
            if client.get_experiment_by_name(experiment) is None:
                raise
    elif EXPERIMENT_KIND[0] not in found.tags:  # made by an older version, or by MLflow itself
        client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive ``flock`` on ``path`` (created if missing) while the block runs."""
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


LOCK_FILE = ".lock"


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock."""


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str):
    """A non-blocking exclusive ``flock`` on ``path`` held while the block runs, with this process's id
    and command line written into the file. Held by a live process: :class:`FolderLockedError` naming
    it. The kernel drops an ``flock`` when its process dies, so a lock file left by a killed process
    (a dead PID) is simply taken over."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise FolderLockedError(f"{what} is in use by {owner}; wait for it to end, stop it, or use another "
                                    "folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} ({_command_line()})\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def _command_line() -> str:
    try:
        with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
            return " ".join(part.decode(errors="replace") for part in f.read().split(b"\0") if part)[:300]
    except OSError:
        import sys

        return " ".join(sys.argv)[:300]


def lock_owner_pid(path: Path) -> Optional[int]:
    """The process id written in a lock file (None if none)."""
    try:
        match = re.match(r"process (\d+)", Path(path).read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def make_logger(config: TrackingConfig, run_dir: Path, run_name: str, tags: dict):
    """The run's ``MLFlowLogger``, reusing the MLflow run recorded in ``run_dir`` if any."""
    from lightning.pytorch.loggers import MLFlowLogger

    uri, artifact_location = resolve_tracking_uri(config.uri, Path(run_dir).parent)
    with store_lock(uri):
        ensure_experiment(uri, config.experiment, artifact_location)
        run_id = read_run_id(run_dir)
        if run_id is not None:
            check_run_exists(uri, run_id, run_dir)
        return MLFlowLogger(experiment_name=config.experiment, run_name=run_name, tracking_uri=uri, tags=tags,
                            artifact_location=artifact_location, run_id=run_id)


def check_run_exists(uri: str, run_id: str, run_dir: Path) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as err:
        raise ConfigError(
            f"{Path(run_dir) / RUN_ID_FILE} names MLflow run {run_id}, which the tracking store {uri} does not have "
            f"({err.error_code}). Set MLFLOW_TRACKING_URI (or --tracking.uri) to the store holding it, or delete "
            "that file to log the resumed training into a new MLflow run") from err


def run_tags(preset: str, variant: str, seed: Any, run_dir: Path, extra: dict) -> dict:
    tags = {"preset": str(preset), "variant": str(variant), "seed": str(seed), "git_commit": git_commit(),
            "run_dir": str(Path(run_dir).resolve())}
    tags.update(_dotted(extra or {}))
    return tags


def _dotted(tags: dict, prefix: str = "") -> dict:
    """Tag keys with dots (``fwpkm.grid``) come back from YAML configs as nested mappings: flatten them."""
    out = {}
    for k, v in tags.items():
        key = f"{prefix}{k}"
        out.update(_dotted(v, key + ".") if isinstance(v, dict) else {key: str(v)})
    return out


MAX_PARAM_VALUE = 6000  # MLflow 3's limit on a param value


def flat_params(config: dict) -> dict:
    """Flattened dotted params, values as strings within MLflow's limits."""
    out = {}
    for key, value in leaves(config):
        key = re.sub(r"[^\w\-. /]", "_", key)[:250]
        text = "None" if value is None else str(value)
        out[key] = text[:MAX_PARAM_VALUE]
    return out


class TrackingCallback(Callback):
    """On fit start (rank 0): record the MLflow run id in the run folder, log params (only those
    the run does not have yet, so a resumed run keeps its params), tags and config artifacts."""

    def __init__(self, run_dir: str, params: dict, tags: dict, artifacts: list[str], system_metrics_s: float = 0.0):
        self.run_dir = Path(run_dir)
        self.params = params
        self.tags = tags
        self.artifacts = artifacts
        self.system_metrics_s = system_metrics_s
        self.monitor = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lit.callbacks import log_artifacts, mlflow_logger

        logger = mlflow_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        client, run_id = logger.experiment, logger.run_id
        (self.run_dir / RUN_ID_FILE).write_text(run_id + "\n")
        existing = client.get_run(run_id).data.params
        datamodule = getattr(trainer, "datamodule", None)
        if getattr(datamodule, "global_batch_size", None):  # rows per optimizer step over all ranks
            self.params = {**self.params, "data.global_batch_size": str(datamodule.global_batch_size),
                           "trainer.world_size": str(trainer.world_size)}
        changed = {k: v for k, v in self.params.items() if k in existing and existing[k] != v}
        new = {k: v for k, v in self.params.items() if k not in existing}
        if changed:
            warnings.warn("resuming with changed options (MLflow params keep their first value; the new values are "
                          f"recorded as 'resumed.*' tags): {sorted(changed)}", stacklevel=2)
        from mlflow.entities import Param, RunTag

        items = list(new.items())
        for start in range(0, len(items), 100):
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[start:start + 100]])
        tags = dict(self.tags)
        tags.update({f"resumed.{k}"[:250]: v[:5000] for k, v in changed.items()})
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        log_artifacts(trainer, self.artifacts)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A failed run (a checkpoint that could not be saved, a non-finite loss...): its one-line cause as
        the ``fwpkm.error`` tag (Lightning then marks the MLflow run FAILED)."""
        from lit.callbacks import mlflow_logger

        logger = mlflow_logger(trainer)
        if logger is None or not trainer.is_global_zero or isinstance(exception, KeyboardInterrupt):
            return
        message = " ".join(f"{type(exception).__name__}: {exception}".split())[:5000]
        with contextlib.suppress(Exception):  # the store may be on the disk that just filled up
            logger.experiment.set_tag(logger.run_id, "fwpkm.error", message)
        self._stop_monitor()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lit.callbacks import mlflow_logger

        logger = mlflow_logger(trainer)
        if logger is not None and trainer.is_global_zero:  # after a resume: the step it resumed from
            logger.experiment.set_tag(logger.run_id, "fwpkm.started_at_step", str(trainer.global_step))
            self._start_monitor(logger.run_id, logger.experiment.tracking_uri)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_monitor()

    def _start_monitor(self, run_id: str, uri: str) -> None:
        """MLflow's system-metrics monitor (a thread sampling psutil, and NVML when installed)."""
        if self.system_metrics_s <= 0:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as err:  # psutil missing: the run goes on without them
            warnings.warn(f"no MLflow system metrics ({err}); pip install psutil", stacklevel=2)
            return
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=self.system_metrics_s, resume_logging=True,
                                            tracking_uri=uri)
        self.monitor_run = (run_id, uri)
        self.monitor.start()

    def _stop_monitor(self) -> None:
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                self.monitor.finish()
                # MLflow's loop logs after a whole sampling interval and drops a partial one at shutdown:
                # a run shorter than the interval would have no system metrics at all, so take one sample now
                from mlflow.tracking import MlflowClient

                run_id, uri = self.monitor_run
                if not MlflowClient(uri).get_metric_history(run_id, "system/system_memory_usage_megabytes"):
                    self.monitor.collect_metrics()
                    self.monitor.publish_metrics(self.monitor.aggregate_metrics())
                    self.monitor.mlflow_logger.flush()
            self.monitor = None


# --------------------------------------------------------------------------- stores shared by grids and studies


@dataclass
class Store:
    """An MLflow tracking store and the experiment the grid (or study) logs into."""

    uri: str
    experiment: str
    artifact_location: Optional[str]
    experiment_id: str = ""
    runs_dir: Path = Path("runs")

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def lock(self, name: str):
        """An exclusive lock (a file in the runs folder) for find-or-create sections."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        return file_lock(self.runs_dir / f".{name}.lock")


def open_store(runs_dir: Path, experiment: str, tracking_uri: Optional[str] = None) -> Store:
    """The store of ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<runs>/mlflow.db``
    (artifacts next to a SQLite database in ``mlartifacts/``); creates the experiment if missing."""
    runs_dir = Path(runs_dir).resolve()
    uri, artifacts = resolve_tracking_uri(tracking_uri, runs_dir)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    with store_lock(uri):
        ensure_experiment(uri, experiment, artifacts)
    store = Store(uri=uri, experiment=experiment, artifact_location=artifacts, runs_dir=runs_dir)
    store.experiment_id = store.client.get_experiment_by_name(experiment).experiment_id
    return store


def browse_hint(uri: str, experiment_id: Optional[str] = None, run_id: Optional[str] = None,
                search: Optional[str] = None) -> str:
    """How to look at a run, or at an experiment's runs (filtered by ``search``), in MLflow's UI; the
    link asks for the model-training pages (MLflow 3 opens on GenAI ones unless told otherwise)."""
    from urllib.parse import quote

    page = ""
    if experiment_id is not None:
        page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "/runs")
        page += "?workflowType=machine_learning" + (f"&searchFilter={quote(search)}" if search and not run_id else "")
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000/{page}"


def search_runs(store: Store, filter_string: str = "", experiment_ids: Optional[list] = None) -> list:
    client, out, token = store.client, [], None
    while True:
        page = client.search_runs(experiment_ids or [store.experiment_id], filter_string, max_results=1000,
                                  page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def tag_filter(**tags: str) -> str:
    return " and ".join(f"tags.`{k.replace('__', '.')}` = '{v}'" for k, v in tags.items())


# A grid's or study's runs point to its summary run with this tag, not with MLflow's mlflow.parentRunId:
# MLflow's UI folds nested runs under their parent, and its charts then plot only the parents.
PARENT_TAG = "fwpkm.parent_run"


def child_runs(store: Store, parent) -> list:
    """The runs of a grid or study (``PARENT_TAG``; stores written before it: ``mlflow.parentRunId``)."""
    found = {}
    for key in ("fwpkm__parent_run", "mlflow__parentRunId"):
        for run in search_runs(store, tag_filter(**{key: parent.info.run_id}), [parent.info.experiment_id]):
            found.setdefault(run.info.run_id, run)
    return list(found.values())


def find_parent(store: Store, role: str, name: str):
    """The parent run of a grid (role "grid") or study (role "study"), the oldest if several."""
    runs = search_runs(store, tag_filter(**{"fwpkm__role": role, f"fwpkm__{role}": name}))
    runs.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
    return runs[0] if runs else None


def ensure_parent(store: Store, role: str, name: str, tags: Optional[dict] = None) -> str:
    """Find or create the parent run (under a lock, so concurrent runners share one)."""
    with store.lock(f"{role}-{name}"):
        run = find_parent(store, role, name)
        if run is not None:
            return run.info.run_id
        all_tags = {"fwpkm.role": role, f"fwpkm.{role}": name, "mlflow.runName": f"{role}:{name}"}
        all_tags.update(tags or {})
        run = store.client.create_run(store.experiment_id, tags=all_tags, run_name=f"{role}:{name}")
        return run.info.run_id


def set_shared_tag(client, run_id: str, key: str, value: str, attempts: int = 4) -> None:
    """``set_tag`` on a run that workers on other machines write too: an MLflow server on PostgreSQL
    inserts a new tag without a lock, so two workers setting it at once fail one with a unique-key
    violation; the retry then updates the row."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return client.set_tag(run_id, key, value)
        except MlflowException as err:
            if attempt == attempts - 1 or "unique" not in str(err).lower():
                raise
            time.sleep(0.2 * (attempt + 1))


def set_running(store: Store, run_id: str) -> None:
    store.client.update_run(run_id, status="RUNNING")
