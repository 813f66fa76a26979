"""A grid shared by workers on several machines, on real servers: a PostgreSQL server (the Optuna
storage that holds the grid's cells as a queue, and the MLflow server's backend) and an
``mlflow server``, both started here on loopback ports. Two ``fwpkm ablate`` workers run from
separate working directories (no shared run folder, as on two machines); one is killed mid-run and
the other takes its cell over. Skipped, with the reason, where PostgreSQL, psycopg or the full
mlflow package (``pip install -e ".[cluster]"``) are missing."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 420
GRID_ONLY = ["base", "no_memory"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.skip(f"PostgreSQL is not installed (no {name}; apt-get install postgresql)")
    return found


def as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` user."""
    if os.geteuid() != 0:
        return cmd
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no postgres user to run the PostgreSQL server as")
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL server on a loopback port; yields its URL prefix postgresql://fwpkm@host:port."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[cluster]')")
    import psycopg

    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    data = Path(tempfile.mkdtemp(prefix="fwpkm-pg-"))  # not under pytest's root-only tmp folders
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    subprocess.run(as_server_user([initdb, "-D", str(data / "db"), "-A", "trust", "-U", "fwpkm", "--no-sync"]),
                   check=True, capture_output=True, timeout=120)
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(as_server_user([pg_ctl, "-D", str(data / "db"), "-o", options, "-l", str(data / "server.log"),
                                   "-w", "start"]), check=True, capture_output=True, timeout=120)
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="fwpkm", dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE optuna")
            conn.execute("CREATE DATABASE mlflow")
        yield f"postgresql://fwpkm@127.0.0.1:{port}"
    finally:
        subprocess.run(as_server_user([pg_ctl, "-D", str(data / "db"), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory, wait_healthy):
    """``mlflow server`` on a loopback port, its runs in PostgreSQL, artifacts served from a folder."""
    pytest.importorskip("mlflow.server", reason="the mlflow server is not installed (pip install -e '.[cluster]')")
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{postgres}/mlflow",
           "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, proc, "mlflow server", timeout=180)
        except RuntimeError as err:
            raise RuntimeError(f"{err}:\n{(folder / 'server.log').read_text()[-3000:]}") from None
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def worker_env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PL_", "LOCAL_RANK", "NODE_RANK",
                                                                   "FWPKM_"))}
    e.update(PYTHONPATH=str(ROOT), CI="true", OMP_NUM_THREADS="1", MLFLOW_ENABLE_ASYNC_LOGGING="false",
             JSONARGPARSE_DEPRECATION_WARNINGS="off")
    return e


def start_worker(folder: Path, storage: str, tracking: str) -> subprocess.Popen:
    folder.mkdir()
    cmd = [sys.executable, "-m", "ablations", "ablate", "smoke", "--only", *GRID_ONLY, "--storage", storage,
           "--tracking-uri", tracking, "--heartbeat", "1"]
    return subprocess.Popen(cmd, cwd=folder, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_two_machines_share_a_grid_and_one_takes_over_the_other_s_killed_run(tmp_path, postgres, mlflow_server):
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    storage = f"{postgres}/optuna"
    first, second = start_worker(tmp_path / "a", storage, mlflow_server), None
    try:
        second = start_worker(tmp_path / "b", storage, mlflow_server)
        deadline = time.time() + TIMEOUT
        while not glob.glob(str(tmp_path / "a" / "runs" / "ablations" / "smoke" / "*" / "seed0" / "mlflow_run_id")):
            assert first.poll() is None, f"worker a ended before it was killed:\n{first.communicate()[0][-4000:]}"
            assert time.time() < deadline, "worker a never started a training"
            time.sleep(0.2)
        killed_cell = Path(glob.glob(str(tmp_path / "a" / "runs" / "ablations" / "smoke" / "*" / "seed0"))[0])
        killed_run = (killed_cell / "mlflow_run_id").read_text().strip()
        os.killpg(first.pid, signal.SIGKILL)  # worker a and its `fwpkm train`, mid-run
        first.communicate()
        out = second.communicate(timeout=TIMEOUT)[0]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    assert second.returncode == 0, out[-6000:]
    assert f"taking over smoke/{killed_cell.parent.name}/seed0" in out

    # Optuna: one COMPLETE trial per cell, the killed one FAIL and retried once
    study_name = next(s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name.startswith("grid:"))
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    complete = sorted(t.user_attrs["key"] for t in trials if t.state == TrialState.COMPLETE)
    assert complete == sorted(f"smoke/{v}/seed0" for v in GRID_ONLY)
    assert [t.user_attrs["key"] for t in trials if t.state == TrialState.FAIL] == [f"smoke/{killed_cell.parent.name}/seed0"]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]

    # MLflow: each cell FINISHED exactly once, evaluated; the dead worker's run closed as KILLED
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("fwpkm-ablations")
    runs = client.search_runs([experiment.experiment_id], "tags.`fwpkm.role` = 'grid-run'")
    finished = sorted(r.data.tags["fwpkm.variant"] for r in runs if r.info.status == "FINISHED")
    assert finished == sorted(GRID_ONLY)
    for r in runs:
        if r.info.status == "FINISHED":
            assert r.data.tags["fwpkm.stage"] == "done" and "val/ppl" in r.data.metrics
            assert "fwpkm.queue_trial" in r.data.tags
    assert client.get_run(killed_run).info.status == "KILLED", (client.get_run(killed_run).data.tags, out[-3000:])
    assert len(runs) == len(GRID_ONLY) + 1
    parents = client.search_runs([experiment.experiment_id], "tags.`fwpkm.role` = 'grid'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
