"""Fixtures shared by the test modules (no test module imports another).

- the memory core against its dense reference (``fwpkm.naive``): ``memory_config``,
  ``make_memory``, ``memory_inputs``, ``compare_with_reference``;
- the model: ``micro_config``, a preset shrunk to milliseconds per step;
- the training command: ``micro_training``, `fwpkm train` on a micro model in a subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fwpkm import FwPKMMemory, MemoryConfig, ModelConfig, naive, preset
from lit.config import merge

ROOT = Path(__file__).resolve().parent.parent


# -- servers started by tests --------------------------------------------------------------


@pytest.fixture(scope="session")
def wait_healthy():
    """wait_healthy(url, proc, what, timeout=120): until ``url/health`` answers 200; fails naming
    ``what`` if ``proc`` exits or the time runs out."""
    import contextlib
    import time
    import urllib.request

    def wait(url: str, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    return
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{what} did not start")
            time.sleep(0.5)

    return wait


# -- the memory core ---------------------------------------------------------------------
SMALL_MEMORY = dict(heads=2, topk=3, n_subkeys=6, k_dim=6, v_dim=5, chunk_size=5)


@pytest.fixture(scope="session")
def memory_config():
    """memory_config(**overrides): a small MemoryConfig (2 heads, 6^2 slots, chunks of 5)."""
    return lambda **overrides: MemoryConfig(**(SMALL_MEMORY | overrides))


@pytest.fixture(scope="session")
def make_memory(memory_config):
    """make_memory(seed=0, **overrides): a float64 FwPKMMemory of memory_config(**overrides)."""

    def make(seed=0, **overrides):
        torch.manual_seed(seed)
        mem = FwPKMMemory(memory_config(**overrides)).double()
        with torch.no_grad():
            mem.keys.normal_()  # spread keys so top-k has no near-ties
        return mem

    return make


@pytest.fixture(scope="session")
def memory_inputs():
    """memory_inputs(mem, B=2, T=13, seed=1, gated=False, masked=False): float64 (q, v, gates, mask)
    for ``mem``; q, v and the gates are leaves; gates and mask are None unless asked for."""

    def inputs(mem, B=2, T=13, seed=1, gated=False, masked=False):
        g = torch.Generator().manual_seed(seed)
        c = mem.config
        q = torch.randn(B, T, c.heads * c.k_dim, generator=g, dtype=torch.float64, requires_grad=True)
        v = torch.randn(B, T, c.v_dim, generator=g, dtype=torch.float64, requires_grad=True)
        gates = torch.rand(B, T, generator=g, dtype=torch.float64).requires_grad_(True) if gated else None
        mask = (torch.rand(B, T, generator=g) > 0.3).double() if masked else None
        return q, v, gates, mask

    return inputs


@pytest.fixture(scope="session")
def compare_with_reference():
    """compare_with_reference(mem, q, v, gates, mask, chunk=None): one training call of ``mem``
    against fwpkm.naive.run from the same state: reads, final keys and values, meta-gradients."""

    def compare(mem, q, v, gates, mask, chunk=None):
        chunk = chunk or mem.config.chunk_size
        keys0, values0 = mem.keys.clone(), mem.values.clone()
        mem.train()
        out = mem(q, v, gates, mask, chunk_size=chunk).output
        ref_out, ref_k, ref_v = naive.run(keys0, values0, q, v, gates, mask, dataclasses.asdict(mem.config), chunk)
        torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(mem.keys, ref_k.detach(), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(mem.values, ref_v.detach(), rtol=1e-9, atol=1e-10)

        probe = torch.randn_like(out)
        wrt = [t for t in (q, v, gates) if t is not None]
        grads = torch.autograd.grad((out * probe).sum(), wrt)
        ref_grads = torch.autograd.grad((ref_out * probe).sum(), wrt)
        for name, got, want in zip(("q", "v", "gates"), grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10, msg=lambda m: f"meta-gradient {name}: {m}")

    return compare


# -- the model ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def micro_config():
    """micro_config(name="tiny", **overrides): a preset shrunk so a forward/backward takes milliseconds."""

    def micro(name="tiny", **overrides) -> ModelConfig:
        data = preset(name).to_dict()
        data = merge(data, {"d_model": 32, "ffn_hidden": 64, "vocab_size": 50,
                            "attention.n_heads": 2, "attention.n_kv_heads": 1, "attention.head_dim": 16,
                            "attention.window": 8, "gdn.n_heads": 2, "gdn.head_dim": 16,
                            "pkm.n_subkeys": 8, "pkm.k_dim": 16, "pkm.v_dim": 16, "pkm.topk": 4,
                            "block.memory.n_subkeys": 8, "block.memory.k_dim": 16,
                            "block.memory.v_dim": 16, "block.memory.chunk_size": 8,
                            "block.fwmlp.hidden": 32, "block.fwmlp.k_dim": 16, "block.fwmlp.v_dim": 16,
                            "block.fwmlp.chunk_size": 8} | overrides)
        return ModelConfig.from_dict(data)

    return micro


# -- the training command ----------------------------------------------------------------
class MicroTraining:
    """`fwpkm train` (lit.cli) on a micro model in a subprocess, and what it records in MLflow."""

    root = ROOT
    # 2 layers (full attention with PKM, Gated DeltaNet with FwPKM), d_model 32
    overrides = {
        "d_model": 32, "ffn_hidden": 64, "mixers": ["fa", "gdn"], "pkm_layers": [0], "memory_layers": [1],
        "attention.n_heads": 2, "attention.n_kv_heads": 1, "attention.head_dim": 16, "attention.window": 16,
        "gdn.n_heads": 2, "gdn.head_dim": 16,
        "pkm.heads": 1, "pkm.topk": 4, "pkm.n_subkeys": 8, "pkm.k_dim": 16, "pkm.v_dim": 16,
        "block.memory.chunk_size": 16, "block.memory.n_subkeys": 8, "block.memory.topk": 4,
        "block.memory.k_dim": 16, "block.memory.v_dim": 16,
    }
    args = [
        *(arg for key, value in overrides.items() for arg in (f"--model.{key}", json.dumps(value))),
        "--train.fa_to_swa_prob", "0.5", "--optim.warmup_steps", "2", "--train.plot_every_n_steps", "4",
        "--data.seq_len", "32", "--data.batch_size", "4", "--data.max_documents", "200",
        "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1",
    ]

    def env(self, **extra) -> dict:
        e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PL_", "LOCAL_RANK", "NODE_RANK"))}
        e.update(PYTHONPATH=str(ROOT), CI="true", OMP_NUM_THREADS="1", MLFLOW_ENABLE_ASYNC_LOGGING="false",
                 JSONARGPARSE_DEPRECATION_WARNINGS="off")
        e.update(extra)
        return e

    def command(self, run_dir: Path, *args: str) -> list[str]:
        return [sys.executable, "-m", "lit.cli", "--run_dir", str(run_dir), *self.args, *args]

    def run(self, run_dir: Path, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.command(run_dir, *args), cwd=ROOT, env=self.env(), capture_output=True, text=True,
                              timeout=300, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return proc

    def start(self, run_dir: Path, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(run_dir, *args), cwd=ROOT, env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def mlflow_client(self, run_dir: Path):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")

    def run_id(self, run_dir: Path) -> str:
        return (run_dir / "mlflow_run_id").read_text().strip()

    def losses(self, run_dir: Path) -> dict[int, float]:
        history = self.mlflow_client(run_dir).get_metric_history(self.run_id(run_dir), "train/loss")
        return {m.step: m.value for m in history}


@pytest.fixture(scope="session")
def micro_training() -> MicroTraining:
    return MicroTraining()
