"""MLflow 3's UI as a user meets it, in a real browser: `fwpkm ablate smoke` makes a store, `mlflow ui`
serves it on a loopback port and headless Chromium renders the experiment's runs page and one run's
page (``--dump-dom``, after the app's scripts ran). Skipped, with the reason, where Chromium
(``apt-get install chromium``) or the full mlflow package (``pip install -e ".[ui]"``) are missing."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["base", "no_memory"]


def chromium() -> str:
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if not found:
        pytest.skip("no Chromium to render the MLflow UI (apt-get install chromium)")
    return found


def page_text(browser: str, url: str) -> str:
    """The visible text of a page once its scripts have run."""
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--window-size=1600,1000", "--virtual-time-budget=30000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180).stdout
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.fixture
def browser() -> str:
    pytest.importorskip("mlflow.server", reason="the MLflow UI is not installed (pip install -e '.[ui]')")
    return chromium()


@pytest.fixture
def smoke_store(browser, tmp_path):  # after the skips: no grid is run where the browser check cannot be
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FWPKM_"))}
    env.update(PYTHONPATH=str(ROOT), CI="true", OMP_NUM_THREADS="1", JSONARGPARSE_DEPRECATION_WARNINGS="off",
               MLFLOW_TRACKING_URI=uri)
    proc = subprocess.run([sys.executable, "-m", "ablations", "ablate", "smoke", "--only", *VARIANTS,
                           "--runs-dir", str(tmp_path / "runs")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return uri, proc.stdout


def test_mlflow_ui_opens_the_grid_on_its_runs_with_their_metrics(browser, smoke_store, tmp_path, wait_healthy):
    from mlflow.tracking import MlflowClient

    uri, out = smoke_store
    hint = next(line for line in out.splitlines() if "compare the runs:" in line)
    page = re.search(r"open http://127\.0\.0\.1:5000/(\S+)", hint).group(1)  # the link the lab prints
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, "mlflow ui")
        runs_page = page_text(browser, f"http://127.0.0.1:{port}/{page}")
        assert "Detect Issues" not in runs_page and "No data available" not in runs_page  # not the GenAI pages
        assert f"{len(VARIANTS) + 1} matching runs" in runs_page  # the link's filter: the grid's runs
        for variant in VARIANTS:  # the grid's runs are rows of the table, not folded under the parent
            assert f"smoke/{variant}/seed0" in runs_page, runs_page[:3000]
        assert "grid:smoke" in runs_page

        client = MlflowClient(tracking_uri=uri)
        run = client.search_runs([client.get_experiment_by_name("fwpkm-ablations").experiment_id],
                                 "attributes.run_name = 'smoke/base/seed0'")[0]
        run_page = page_text(browser, f"http://127.0.0.1:{port}/#/experiments/{run.info.experiment_id}/runs/"
                                      f"{run.info.run_id}?workflowType=machine_learning")
        assert "val/ppl" in run_page and f"{run.data.metrics['val/ppl']:.3f}"[:5] in run_page, run_page[:3000]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
