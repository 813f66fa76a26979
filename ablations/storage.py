"""Optuna storages shared by workers of a study or a grid queue: URLs, heartbeats, retries."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Optional

HEARTBEAT_S = 60.0


class StorageError(ValueError):
    pass


def rdb_storage(url: str, attempts: int = 5, **kwargs):
    """``optuna.storages.RDBStorage``, tried again when workers that start together on a new database
    race on creating its tables (PostgreSQL then fails the losers with a unique-constraint error)."""
    import optuna

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(1.0 + attempt)


def storage_object(url: str):
    """An Optuna RDB storage with a patient SQLite connection (several workers share the file)."""
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return rdb_storage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    if "://" in url and not url.startswith(("redis", "journal")):
        return rdb_storage(url)
    return url


def public_url(url: str) -> str:
    """The storage URL without its password (for tags and logs)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def retry_callback(max_retry: Optional[int], inherit_intermediate_values: bool = False):
    """Optuna's callback that enqueues a heartbeat-stale trial again (renamed in Optuna 4.9)."""
    from optuna import storages

    cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    return cls(max_retry=max_retry, inherit_intermediate_values=inherit_intermediate_values)


def retried_from(frozen) -> Optional[int]:
    """The number of the first trial of a retry series that Optuna's retry callback started, if any."""
    return frozen.system_attrs.get("failed_trial")


def heartbeat_storage(url: str, heartbeat_s: float = HEARTBEAT_S, max_retry: Optional[int] = 3,
                      inherit_intermediate_values: bool = False):
    """An Optuna RDB storage with heartbeats: trials whose worker stops beating for ``3 x heartbeat_s``
    are failed by the next worker and enqueued again (at most ``max_retry`` times)."""
    import inspect
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

    if "://" not in url or url.startswith(("redis", "journal")):
        raise StorageError(f"--storage {url}: a shared queue needs an RDB storage URL "
                         f"(postgresql://..., mysql://..., sqlite:///...)")
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"heartbeat_interval": max(1, int(round(heartbeat_s))), "grace_period": max(3, int(round(3 * heartbeat_s)))}
    params = inspect.signature(optuna.storages.RDBStorage).parameters
    name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
    kwargs[name] = retry_callback(max_retry, inherit_intermediate_values)
    if url.startswith("sqlite:///"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    return rdb_storage(url, **kwargs)


class Heartbeat:
    """Records a running trial's heartbeat in the storage every interval, from a thread."""

    def __init__(self, storage, trial_id: int, interval_s: float):
        self.storage, self.trial_id, self.interval_s = storage, trial_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{trial_id}")

    def _beat(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a storage hiccup must not kill the run; grace covers it
                self.storage.record_heartbeat(self.trial_id)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self):
        self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
