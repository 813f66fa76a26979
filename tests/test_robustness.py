"""Nothing lost, nothing silent (issue 18): atomic checkpoints under kills and full disks, exclusive run
folders, children that die with their runner, strings that stay strings in YAML, and one named line
(exit code 2, no traceback) for every bad input of the probes."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

STEPS = ("--checkpoint.every_n_steps", "1")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    from ablations.__main__ import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error:" in line]


# --------------------------------------------------------------------------- (2) strings stay strings


@pytest.mark.parametrize("text", ["552743e64060", "1e5", "-3E+2", "123", "0x10", "inf", ".nan", "yes", "1_000",
                                  "12.5"])
def test_strings_that_look_like_numbers_stay_strings_through_yaml(text, tmp_path):
    import yaml
    from jsonargparse import ArgumentParser

    from lit.cli import parse_run_config
    from lit.config import dump_yaml

    dumped = dump_yaml({"tracking": {"tags": {"fwpkm.config_hash": text}}})
    assert yaml.safe_load(dumped)["tracking"]["tags"]["fwpkm.config_hash"] == text
    parser = ArgumentParser()
    parser.add_argument("--x", type=dict[str, str])
    assert parser.parse_string(dump_yaml({"x": {"h": text}})).x == {"h": text}  # jsonargparse's own loader
    path = tmp_path / "run.yaml"
    path.write_text(dump_yaml({"tracking": {"tags": {"fwpkm.config_hash": text}}, "trainer": {"max_steps": 1}}))
    _, _, namespace = parse_run_config(["--config", str(path)])
    assert namespace.tracking.tags == {"fwpkm.config_hash": text}


def test_grid_config_with_a_numeric_looking_hash_parses(tmp_path, monkeypatch):
    """The runner's grid_config.yaml of a run whose hash reads as a float (552743e64060) is a valid config."""
    from ablations.grid import load_grid, resolve_runs
    from ablations.runner import GridRunner
    from lit.cli import parse_run_config
    from lit.tracking import Store

    grid = load_grid("smoke")
    spec = resolve_runs(grid, tmp_path / "runs", only=["base"])[0]
    spec.config_hash = "552743e64060"
    runner = GridRunner(grid, [spec], Store(uri="sqlite:///x.db", experiment="e", artifact_location=None))
    runner.parent_id = "0123e45"
    spec.run_dir.mkdir(parents=True)
    _, _, namespace = parse_run_config(["--config", str(runner._write_config(spec, None))])
    assert namespace.tracking.tags["fwpkm.config_hash"] == "552743e64060"
    assert namespace.tracking.tags["fwpkm.parent_run"] == "0123e45"


# --------------------------------------------------------------------------- (1) atomic checkpoints


class FullDisk:
    """AtomicCheckpointIO.write that fails with ENOSPC after writing ``after`` bytes."""

    def __init__(self, after: int):
        self.after = after

    def __call__(self, handle, data):
        handle.write(bytes(data[: self.after]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("after", [0, 1, 100, 4096, 10**9])
def test_a_failed_save_keeps_the_previous_checkpoint_whole(after, tmp_path, monkeypatch):
    from lit.callbacks import AtomicCheckpointIO, CheckpointSaveError

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "w": torch.arange(1000.0)}, path)
    before = path.read_bytes()
    big = {"global_step": 4, "w": torch.arange(5000.0)}
    if after < 10**9:
        monkeypatch.setattr(AtomicCheckpointIO, "write", staticmethod(FullDisk(after)))
        with pytest.raises(CheckpointSaveError) as err:
            io.save_checkpoint(big, path)
        message = str(err.value)
        assert "No space left on device" in message and f"last complete checkpoint is {path} (step 3)" in message
        assert path.read_bytes() == before and step_of(path) == 3
    else:  # the write went through: the new checkpoint replaced the old one
        io.save_checkpoint(big, path)
        assert step_of(path) == 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind


INJECT = """
import os, sys, errno
from lit.callbacks import AtomicCheckpointIO
calls = {"n": 0}
fail_at = int(os.environ["FWPKM_TEST_FAIL_AT_SAVE"])
real = AtomicCheckpointIO.write
def write(handle, data):
    calls["n"] += 1
    if calls["n"] >= fail_at:
        handle.write(bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real(handle, data)
AtomicCheckpointIO.write = staticmethod(write)
from lit.cli import train
sys.exit(train(sys.argv[1:]))
"""


def test_enospc_injected_into_training_saves_then_resume(micro_training, tmp_path):
    """Saves 2 and 5 of a training fail with ENOSPC: a one-line error naming the last complete checkpoint,
    the MLflow run FAILED with that message, last.ckpt whole; the same command then resumes to the end."""
    run_dir = tmp_path / "runs" / "enospc"
    args = ("--trainer.max_steps", "6", *STEPS, "--checkpoint.save_best", "false")
    last = run_dir / "checkpoints" / "last.ckpt"
    steps = []
    for fail_at in (2, 5):
        cmd = [sys.executable, "-c", INJECT, "--run_dir", str(run_dir), *micro_training.args, *args]
        proc = subprocess.run(cmd, cwd=micro_training.root, env=micro_training.env(FWPKM_TEST_FAIL_AT_SAVE=str(fail_at)),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-3000:]
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "No space left on device" in lines[0] and f"last complete checkpoint is {last}" in lines[0], lines
        steps.append(step_of(last))
        run = micro_training.mlflow_client(run_dir).get_run(micro_training.run_id(run_dir))
        assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["fwpkm.error"]
        assert not list(last.parent.glob(".*partial"))
    assert steps[0] >= 1 and steps[1] > steps[0]  # every complete save before a failure was kept
    micro_training.run(run_dir, *args)
    assert step_of(last) == 6
    assert set(micro_training.losses(run_dir)) >= set(range(6))


def _can_mount_tmpfs(target: Path) -> str:
    if os.geteuid() != 0:
        return "not root"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16M", "tmpfs", str(target)], capture_output=True,
                          text=True)
    return "" if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip() or proc.returncode}"


def test_real_full_disk_keeps_last_checkpoint_and_resumes(micro_training, tmp_path):
    """A 16 MB tmpfs filled up to leave room for half a checkpoint: the save that does not fit fails
    with one line, last.ckpt stays whole; after freeing space the same command resumes to the end."""
    disk = tmp_path / "disk"
    disk.mkdir()
    reason = _can_mount_tmpfs(disk)
    if reason:
        print(f"skipping the real-filesystem variant: {reason} (the injection variant runs everywhere)")
        pytest.skip(reason)
    try:
        run_dir = disk / "runs" / "full"
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the store off the small disk: only checkpoints fill it
        args = ("--trainer.max_steps", "8", *STEPS, "--checkpoint.save_best", "false", "--tracking.uri", uri,
                "--train.plot_every_n_steps", "0")
        micro_training.run(run_dir, "--trainer.max_steps", "1", *args[2:])
        last = run_dir / "checkpoints" / "last.ckpt"
        size = last.stat().st_size
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * max(0, free - size // 2))  # the next save cannot fit
        proc = micro_training.run(run_dir, *args, check=False)
        assert proc.returncode == 1, proc.stderr[-3000:]
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr[-3000:]
        kept = step_of(last)  # loads: the checkpoint is whole
        assert kept >= 1
        (disk / "filler").unlink()
        micro_training.run(run_dir, *args)
        assert step_of(last) == 8
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_sigkill_during_saves_never_loses_the_last_checkpoint(micro_training, tmp_path):
    """Kill -9 a training at several points of its saves (while a temporary file exists, right after a
    save, between saves): each time last.ckpt loads, its step never goes back, and the same command
    finally resumes to the end."""
    run_dir = tmp_path / "runs" / "killed"
    args = ("--trainer.max_steps", "30", *STEPS, "--checkpoint.save_best", "false", "--train.plot_every_n_steps", "0")
    ckpts = run_dir / "checkpoints"
    last = ckpts / "last.ckpt"
    previous = -1
    for moment in ("during", "after", "during", "between", "during"):
        proc = micro_training.start(run_dir, *args)
        try:
            seen = last.stat().st_mtime_ns if last.is_file() else None
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline:
                if moment == "during" and list(ckpts.glob(".*partial")):
                    break
                if last.is_file() and last.stat().st_mtime_ns != seen:
                    if moment == "between":
                        time.sleep(0.05)
                    break
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.communicate()
        if not last.is_file():
            continue
        step = step_of(last)  # whole: torch.load succeeds
        assert step >= previous
        previous = step
    micro_training.run(run_dir, *args)
    assert step_of(last) == 30
    assert not list(ckpts.glob(".*partial"))


# --------------------------------------------------------------------------- (3) one training per run folder


def _wait_for(predicate, proc=None, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()[1][-3000:]}")
        if time.time() > deadline:
            raise AssertionError("gave up waiting")
        time.sleep(0.05)


def test_a_second_training_on_a_busy_run_folder_is_refused_and_a_dead_lock_taken_over(micro_training, tmp_path):
    from lit.cli import train_lock_path
    from lit.tracking import lock_owner_pid

    run_dir = tmp_path / "runs" / "busy"
    args = ("--trainer.max_steps", "400", "--train.plot_every_n_steps", "0", "--checkpoint.every_n_steps", "1")
    first = micro_training.start(run_dir, *args)
    try:
        _wait_for(lambda: (run_dir / "mlflow_run_id").is_file(), first)
        second = micro_training.run(run_dir, *args, check=False)
        assert second.returncode == 1
        lines = error_lines(second.stderr)
        assert len(lines) == 1 and f"run folder {run_dir} is in use by process {first.pid}" in lines[0], lines
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    lock = train_lock_path(run_dir)
    assert lock_owner_pid(lock) == first.pid  # a stale lock: its process is dead...
    last = run_dir / "checkpoints" / "last.ckpt"
    killed_at = step_of(last) if last.is_file() else 0
    third = micro_training.start(run_dir, *args)
    try:  # ...and the next training takes it over and goes on training the run
        _wait_for(lambda: lock_owner_pid(lock) == third.pid, third)
        _wait_for(lambda: last.is_file() and step_of(last) > killed_at, third)
    finally:
        third.send_signal(signal.SIGKILL)
        third.communicate()


# --------------------------------------------------------------------------- (4) children die with the runner


def test_a_killed_grid_runner_takes_its_training_child_with_it(micro_training, tmp_path):
    from ablations.grid import grid_dir
    from lit.cli import train_lock_path
    from lit.tracking import lock_owner_pid

    runs = tmp_path / "runs"
    runner = subprocess.Popen([sys.executable, "-m", "ablations", "ablate", "smoke", "--only", "base",
                               "--runs-dir", str(runs), "--set", "trainer.max_steps=100000"],
                              cwd=micro_training.root, env=micro_training.env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    lock = train_lock_path(grid_dir(runs, "smoke") / "base" / "seed0")
    try:
        _wait_for(lambda: lock_owner_pid(lock) is not None, runner)
        child = lock_owner_pid(lock)
        assert child != runner.pid
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.communicate()

    def gone() -> bool:
        try:
            state = Path(f"/proc/{child}/status").read_text()
        except OSError:
            return True
        return "\nState:\tZ" in state  # a zombie has stopped running

    _wait_for(gone, seconds=60)


# --------------------------------------------------------------------------- (5) no silent acceptance


def test_a_finished_run_says_so_a_changed_option_is_refused_a_longer_run_is_recorded(micro_training, tmp_path):
    import yaml

    run_dir = tmp_path / "runs" / "done"
    args = ("--trainer.max_steps", "2", "--train.plot_every_n_steps", "0", "--trainer.val_check_interval", "1",
            "--trainer.enable_progress_bar", "true", "--tracking.system_metrics_s", "30")  # longer than the run
    first = micro_training.run(run_dir, *args)
    assert "step (epoch 0): 100%" in first.stdout and "2/2 [" in first.stdout  # one bar over max_steps
    summary = first.stdout[first.stdout.index("[fwpkm] run finished: done"):]
    losses = [float(line.split()[3]) for line in summary.splitlines() if line.strip().startswith(("final", "best"))]
    assert len(losses) == 2 and losses[1] <= losses[0]  # final and best validation loss
    assert "0 -> 2 (max_steps 2)" in summary and "tokens/s" in summary and str(run_dir / "checkpoints") in summary
    assert micro_training.run_id(run_dir) in summary and "mlflow ui --backend-store-uri sqlite:///" in summary
    client = micro_training.mlflow_client(run_dir)
    metrics = client.get_run(micro_training.run_id(run_dir)).data.metrics
    kind = client.get_experiment(client.get_run(micro_training.run_id(run_dir)).info.experiment_id).tags
    assert kind["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3's UI opens it on its runs
    # a run shorter than the sampling interval still gets one sample, taken at its end; psutil's first CPU
    # sample reads 0.0 on some containers, so only its range is checked; memory is always > 0
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100 and metrics["system/system_memory_usage_megabytes"] > 0
    again = micro_training.run(run_dir, *args)
    assert f"run folder {run_dir} already finished at step 2" in again.stdout and "nothing to do" in again.stdout

    changed = micro_training.run(run_dir, *args, "--trainer.limit_val_batches", "1", check=False)
    assert changed.returncode == 2
    lines = error_lines(changed.stderr)
    assert len(lines) == 1 and "trainer.limit_val_batches=2.0 -> 1.0" in lines[0] and "allowed" in lines[0], lines
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["limit_val_batches"] == 2

    longer = micro_training.run(run_dir, *args[2:], "--trainer.max_steps", "3")
    assert "resuming" in longer.stdout and "trainer.max_steps 2 -> 3" in longer.stdout
    assert "2 -> 3 (max_steps 3)" in longer.stdout and "exists and is not empty" not in longer.stderr
    assert yaml.safe_load((run_dir / "config.step2.yaml").read_text())["trainer"]["max_steps"] == 2
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == 3
    assert step_of(run_dir / "checkpoints" / "last.ckpt") == 3


def test_skipped_batches_beyond_the_limit_fail_the_run():
    from types import SimpleNamespace

    from lit.config import RunConfig
    from lit.module import FwPKMLitModule, NonFiniteLossError

    module = FwPKMLitModule.from_run_config(RunConfig.from_dict({"train.nan_policy": "skip"}))
    module._trainer = SimpleNamespace(max_steps=30, global_step=2, world_size=1)
    module.skipped_batches = 3
    module._check_skip_limit()  # 3 of 30 steps (0.1): still allowed
    module.skipped_batches = 28
    with pytest.raises(NonFiniteLossError, match=r"train.max_skipped_fraction=0.1: 28 of 30 batches"):
        module._check_skip_limit()


# --------------------------------------------------------------------------- (5, 6) the probes: one line each


DATA_FILES = {
    "empty.jsonl": (b"", "is empty"),
    "binary.txt": (b"text" + bytes(range(256)) * 20, "is binary, not text (a NUL byte at byte offset 4)"),
    "latin1.txt": ("Caf\u00e9 au lait\n\nsecond\n".encode("latin-1"), "byte 0xe9 at byte offset 3 (line 1)"),
    "bad.jsonl": (b'{"text": "ok"}\n{"text": broken}\n', "line 2 is not valid JSON"),
}

PROBES = [
    (["train", "--trainer.max_step", "5"], "trainer.max_step", "allowed under trainer"),
    (["train", "--data.seq_len", "abc"], "data.seq_len", "int"),
    (["train", "--checkpoint.monitor", "val/nosuch"], "checkpoint.monitor='val/nosuch'", "allowed: val/ppl"),
    (["train", "--model.overrides.block.memory.topk", "100"], "model.overrides", "model options are ordinary"),
    (["train", "--model.block.memory.topk", "100"], "topk=100", "<= memory.n_subkeys"),
    (["eval", "ppl", "--preset", "tiny", "--window", "0"], "--window", "allowed: an integer >= 1"),
    (["eval", "ppl", "--preset", "tiny", "--window", "-5"], "--window", "allowed: an integer >= 1"),
    (["eval", "ppl", "--preset", "tiny", "--batch-size", "0"], "--batch-size", "allowed: an integer >= 1"),
    (["eval", "niah", "--preset", "tiny", "--samples", "0"], "--samples", "allowed: an integer >= 1"),
    (["eval", "inspect", "--preset", "tiny", "--text", "abc", "--slot", "7:99999"], "--slot=7:99999",
     "allowed: 1:0..1023, 3:0..1023"),
    (["eval", "ppl"], "--ckpt or --preset", "required"),
    (["tune", "smoke", "--workers", "0"], "--workers", "allowed: an integer >= 1"),
    (["ablate", "smoke", "--workers", "0"], "--workers", "allowed: an integer >= 1"),
    (["ablate", "smoke", "--set", "data.seq_len=abc"], "data.seq_len='abc'", "allowed: an integer"),
    *((["train", "--data.source", f"DATA/{name}"], f"file DATA/{name}", cause)
      for name, (_, cause) in DATA_FILES.items()),
]


PROBE_IDS = [" ".join(p[0]) for p in PROBES]


@pytest.fixture(scope="module")
def probe_runs(micro_training, tmp_path_factory) -> dict:
    """Every probe run once, two at a time: each is a fresh interpreter whose start-up is most of its
    time. id -> (argv, option, completed process, its folder)."""
    data = tmp_path_factory.mktemp("data")
    for name, (content, _) in DATA_FILES.items():
        (data / name).write_bytes(content)

    def run(probe):
        argv, option, _ = probe
        tmp_path = tmp_path_factory.mktemp("probe")
        argv = [a.replace("DATA", str(data)) for a in argv]
        if argv[0] in ("ablate", "tune"):
            argv += ["--runs-dir", str(tmp_path / "runs")]
        if argv[0] == "eval":
            argv += ["--no-mlflow", "--cpu"]
        if argv[0] == "train":
            argv += ["--run_dir", str(tmp_path / "runs" / "probe")]
        proc = subprocess.run([sys.executable, "-m", "ablations", *argv], cwd=tmp_path, env=micro_training.env(),
                              capture_output=True, text=True, timeout=300)
        return argv, option.replace("DATA", str(data)), proc, tmp_path

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(PROBE_IDS, pool.map(run, PROBES)))


@pytest.mark.parametrize("probe, allowed", [(i, p[2]) for i, p in zip(PROBE_IDS, PROBES)], ids=PROBE_IDS)
def test_every_probe_is_one_named_line_with_exit_code_2(probe, allowed, probe_runs):
    """`fwpkm <probe>` in a subprocess: exit code 2, no traceback, and one error line that starts with
    `fwpkm <cmd>` and names the option and what is allowed (Lightning's "Seed set" and the datasets
    progress bar may also appear on stderr: they are not errors)."""
    argv, option, proc, tmp_path = probe_runs[probe]
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    print(f"PROBE fwpkm {' '.join(argv)} -> {lines}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"fwpkm {argv[0]}") and ": error: " in lines[0], lines
    assert option in lines[0] and allowed in lines[0], lines
    assert not (tmp_path / "runs" / "probe" / "checkpoints").exists()


def test_eval_debug_shows_the_traceback(capsys):
    code, _, err = cli(capsys, "eval", "ppl", "--debug", "--no-mlflow")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("fwpkm eval ppl: error:")


def test_a_full_disk_elsewhere_in_training_is_one_line():
    from lit.cli import disk_full_cause

    class OperationalError(Exception):
        pass

    try:
        try:
            raise OperationalError("(sqlite3.OperationalError) database or disk is full")
        except OperationalError as inner:
            raise RuntimeError("MLflow logging failed") from inner
    except RuntimeError as outer:
        assert "database or disk is full" in disk_full_cause(outer)
    assert disk_full_cause(RuntimeError("something else")) is None
    assert "ENOSPC" in disk_full_cause(OSError(errno.ENOSPC, "ENOSPC"))
