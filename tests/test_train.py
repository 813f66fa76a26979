"""The training stack (lit.module, lit.callbacks, lit.tracking, lit.cli): exact resume after a
kill, validation isolation, DDP, MLflow records, clear errors. CPU only, micro model."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parent.parent

def finish(proc: subprocess.Popen, expect_ok: bool = True) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{out[-3000:]}\n{err[-6000:]}")
    return proc.returncode, out, err


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=1e-5), k


# --------------------------------------------------------------------------- callbacks used by subprocesses


class KillAtStep(Callback):
    """Send this process ``sig`` (SIGKILL; SIGTERM as a scheduler or a stopping `fwpkm ablate` would) when
    optimizer step ``step`` is done (after its checkpoint was written)."""

    def __init__(self, step: int, sig: str = "SIGKILL"):
        self.step, self.sig = step, sig

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), getattr(signal, self.sig))


class DumpFastWeights(Callback):
    """At the end of training every rank writes its fast-weight state to ``out_dir/rank<r>.pt`` and
    the training batches it read to ``out_dir/batches<r>.pt``."""

    def __init__(self, out_dir: str):
        self.out_dir, self.batches = out_dir, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["input_ids"].detach().cpu().clone())

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out_dir, exist_ok=True)
        rank = trainer.global_rank
        torch.save(pl_module.model.fast_weight_state(), os.path.join(self.out_dir, f"rank{rank}.pt"))
        torch.save(self.batches, os.path.join(self.out_dir, f"batches{rank}.pt"))


# --------------------------------------------------------------------------- exact resume + MLflow


def test_resume_after_kill_is_exact_and_logs_into_the_same_mlflow_run(micro_training, tmp_path):
    n, half = 8, 4
    straight, killed = tmp_path / "runs" / "straight", tmp_path / "runs2" / "killed"
    common = ("--trainer.max_steps", str(n), "--checkpoint.every_n_steps", "1")
    a = micro_training.start(straight, *common)
    b = micro_training.start(killed, *common, "--trainer.callbacks+=tests.test_train.KillAtStep",
                    f"--trainer.callbacks.step={half}")
    finish(a)
    code, _, _ = finish(b, expect_ok=False)
    assert code == -signal.SIGKILL
    first_id = micro_training.run_id(killed)
    assert load(killed / "checkpoints" / "last.ckpt")["global_step"] == half
    assert sorted(micro_training.losses(killed)) == list(range(half))

    resumed = micro_training.run(killed, *common)  # the same command again: resumes
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    assert micro_training.run_id(killed) == first_id

    ca, cb = load(straight / "checkpoints" / "last.ckpt"), load(killed / "checkpoints" / "last.ckpt")
    assert ca["global_step"] == cb["global_step"] == n
    assert_same_state(ca["state_dict"], cb["state_dict"])  # weights and fast weights (buffers)
    assert any(".memory.memory.values" in k for k in ca["state_dict"])
    for sa, sb in zip(ca["optimizer_states"][0]["state"].values(), cb["optimizer_states"][0]["state"].values()):
        assert_same_state({k: v for k, v in sa.items() if torch.is_tensor(v)},
                          {k: v for k, v in sb.items() if torch.is_tensor(v)})
    assert ca["lr_schedulers"][0]["last_epoch"] == cb["lr_schedulers"][0]["last_epoch"] == n
    assert ca["FwPKMDataModule"] == cb["FwPKMDataModule"]
    la, lb = micro_training.losses(straight), micro_training.losses(killed)
    assert sorted(la) == sorted(lb) == list(range(n))
    for step in range(n):
        assert math.isclose(la[step], lb[step], rel_tol=1e-5, abs_tol=1e-6), (step, la[step], lb[step])

    # the MLflow run: params, tags, metrics, artifacts; FINISHED after the resumed part
    client = micro_training.mlflow_client(killed)
    run = client.get_run(first_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.preset"] == "tiny" and params["data.seq_len"] == "32"
    assert params["model.d_model"] == "32" and params["trainer.max_steps"] == str(n)
    assert params["optim.lr"] == "0.0003" and params["run_dir"] == str(killed)
    tags = run.data.tags
    assert tags["preset"] == "tiny" and tags["variant"] == "custom" and tags["seed"] == "0"
    assert tags["git_commit"] and tags["fwpkm.started_at_step"] == str(half)
    metrics = run.data.metrics
    for name in ("train/loss", "train/ppl", "train/lr", "train/tokens_per_s", "train/grad_norm", "val/ppl",
                 "val/embedded/ppl", "mem/L1/mem_loss", "mem/L1/addr_loss", "mem/L1/gate_mean",
                 "mem/L1/collision_ratio", "mem/L1/coverage_ratio", "mem/L1/kl_to_uniform", "mem/L1/effective_reads",
                 "mem/L1/grad_norm_values", "mem/L1/grad_norm_keys"):
        assert name in metrics, name
    artifacts = {a.path for a in client.list_artifacts(first_id)}
    assert {"config.yaml", "model_config.yaml", "plots"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(first_id, "plots")}
    assert {"gates_step0000004.png", "slots_step0000004.png", "slots_step0000008.png"} <= plots
    assert (killed / "checkpoints" / "best.ckpt").is_file()


def test_a_run_stopped_by_sigterm_exits_143_is_not_finished_and_the_same_command_resumes_it(micro_training, tmp_path):
    """Lightning stops on SIGTERM with a SystemExit of status 0; a caller (`fwpkm ablate`, a scheduler) must not
    take the stopped run for a finished one."""
    run_dir, common = tmp_path / "runs" / "stopped", ("--trainer.max_steps", "8", "--checkpoint.every_n_steps", "1")
    code, _, err = finish(micro_training.start(run_dir, *common, "--trainer.callbacks+=tests.test_train.KillAtStep",
                                               "--trainer.callbacks.step=3", "--trainer.callbacks.sig=SIGTERM"), expect_ok=False)
    assert code == 143 and "stopped by SIGTERM at step" in err
    assert 3 <= load(run_dir / "checkpoints" / "last.ckpt")["global_step"] < 8
    status = micro_training.mlflow_client(run_dir).get_run(micro_training.run_id(run_dir)).info.status
    assert status != "FINISHED", status
    resumed = micro_training.run(run_dir, *common)
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 8


def test_resume_in_two_invocations_matches_one(micro_training, tmp_path):
    """max_steps=N/2, then the same run folder with max_steps=N (decay_steps pinned so the schedule
    does not depend on max_steps). And the cheap half of reproducing a published number: a twin of the
    uninterrupted run (same config and seed) gives bitwise the same checkpoint, fast weights included,
    and the same final validation loss."""
    n = 6
    straight, split = tmp_path / "runs" / "straight", tmp_path / "runs2" / "split"
    twin = tmp_path / "runs3" / "straight"
    pin = ("--optim.decay_steps", str(n), "--checkpoint.every_n_steps", "100", "--checkpoint.save_best", "false",
           "--tracking.enabled", "false")
    a = micro_training.start(straight, "--trainer.max_steps", str(n), *pin)
    micro_training.run(split, "--trainer.max_steps", str(n // 2), *pin)
    out_a = finish(a)[1]
    assert load(split / "checkpoints" / "last.ckpt")["global_step"] == n // 2  # written at the end
    b = micro_training.start(twin, "--trainer.max_steps", str(n), *pin)
    micro_training.run(split, "--trainer.max_steps", str(n), *pin)
    out_b = finish(b)[1]
    ca, cb = load(straight / "checkpoints" / "last.ckpt"), load(split / "checkpoints" / "last.ckpt")
    assert ca["global_step"] == cb["global_step"] == n
    assert_same_state(ca["state_dict"], cb["state_dict"])
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # tracking disabled

    same, again = ca["state_dict"], load(twin / "checkpoints" / "last.ckpt")["state_dict"]
    assert same.keys() == again.keys() and any(".memory." in k for k in same)
    assert all(torch.equal(same[k], again[k]) for k in same), [k for k in same if not torch.equal(same[k], again[k])]
    finals = [[line for line in out.splitlines() if line.strip().startswith("final val")] for out in (out_a, out_b)]
    assert len(finals[0]) == 1 and finals[0] == finals[1]  # "final val  loss L  ppl P  (step S)"


# --------------------------------------------------------------------------- DDP


def ddp_args(dump: Path, policy: str, devices: int = 2, steps: int = 3) -> tuple:
    return ("--trainer.max_steps", str(steps), "--trainer.strategy", "ddp" if devices > 1 else "auto",
            "--trainer.devices", str(devices), "--train.ddp_fast_weights", policy,
            "--trainer.callbacks+=tests.test_train.DumpFastWeights", f"--trainer.callbacks.out_dir={dump}")


def test_ddp_shards_the_global_batch_keeps_one_memory_and_resumes_exactly(micro_training, tmp_path):
    """2 ranks x 2 rows (policy "mean") against 1 process x 4 rows: the ranks read disjoint halves
    of the one process's global batches, hold one common memory, and give the same model up to
    float reduction order. Killed at step 2, the same command resumes it exactly; resumed on one
    device x 4 rows instead, it reads the next global batches. Policy "local" keeps one memory
    per rank."""
    pin = ("--optim.decay_steps", "4", "--checkpoint.save_best", "false", "--trainer.val_check_interval", "2")
    ddp = ("--data.batch_size", "2", *pin)
    runs = {name: tmp_path / name / "run" for name in ("one", "ddp", "local", "killed", "other")}
    one = micro_training.start(runs["one"], *ddp_args(tmp_path / "dump1", "mean", devices=1, steps=4),
                               "--data.batch_size", "4", *pin, "--tracking.enabled", "false")
    killed = micro_training.start(runs["killed"], *ddp_args(tmp_path / "dump-killed", "mean", steps=4), *ddp,
                                  "--checkpoint.every_n_steps", "1", "--tracking.enabled", "false",
                                  "--trainer.callbacks+=tests.test_train.KillAtStep", "--trainer.callbacks.step=2")
    micro_training.run(runs["ddp"], *ddp_args(tmp_path / "dump2", "mean", steps=4), *ddp)

    r0, r1 = load(tmp_path / "dump2" / "rank0.pt"), load(tmp_path / "dump2" / "rank1.pt")
    assert_same_state(r0, r1, atol=0)  # policy "mean": identical memory on every rank
    straight = load(runs["ddp"] / "checkpoints" / "last.ckpt")
    assert straight["global_step"] == 4
    saved = {k[len("model.layers."):].replace(".memory.memory.", "."): v for k, v in straight["state_dict"].items()
             if ".memory.memory." in k}
    assert_same_state(saved, r0, atol=0)  # the checkpoint holds that common memory
    params = micro_training.mlflow_client(runs["ddp"]).get_run(micro_training.run_id(runs["ddp"])).data.params
    assert (params["data.global_batch_size"], params["trainer.world_size"]) == ("4", "2")  # 2 ranks x 2 rows

    assert finish(killed, expect_ok=False)[0] == -signal.SIGKILL
    assert load(runs["killed"] / "checkpoints" / "last.ckpt")["global_step"] == 2
    shutil.copytree(runs["killed"], runs["other"])
    local = micro_training.start(runs["local"], *ddp_args(tmp_path / "dump-local", "local", steps=2), *ddp,
                                 "--tracking.enabled", "false")
    micro_training.run(runs["killed"], *ddp_args(tmp_path / "dump-resumed", "mean", steps=4), *ddp,
                       "--checkpoint.every_n_steps", "1", "--tracking.enabled", "false")
    resumed = load(runs["killed"] / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 4
    assert_same_state(resumed["state_dict"], straight["state_dict"])  # exact: slow and fast weights
    for sa, sb in zip(resumed["optimizer_states"][0]["state"].values(), straight["optimizer_states"][0]["state"].values()):
        assert_same_state({k: v for k, v in sa.items() if torch.is_tensor(v)},
                          {k: v for k, v in sb.items() if torch.is_tensor(v)})
    finish(local)
    l0, l1 = load(tmp_path / "dump-local" / "rank0.pt"), load(tmp_path / "dump-local" / "rank1.pt")
    assert any(not torch.allclose(l0[k], l1[k]) for k in l0)  # policy "local": the ranks' memories differ

    other = micro_training.run(runs["other"], *ddp_args(tmp_path / "dump3", "mean", devices=1, steps=4),
                               "--data.batch_size", "4", *pin, "--checkpoint.every_n_steps", "1",
                               "--tracking.enabled", "false")
    out_one = finish(one)[1]
    first, second = load(tmp_path / "dump2" / "batches0.pt"), load(tmp_path / "dump2" / "batches1.pt")
    reference = load(tmp_path / "dump1" / "batches0.pt")
    for step in range(4):  # the ranks read disjoint parts that make up the one process's global batch
        assert not (first[step][:, None] == second[step][None]).all(-1).any()
        assert torch.equal(torch.cat([first[step], second[step]]), reference[step]), step
    moved = load(tmp_path / "dump3" / "batches0.pt")  # resumed on one device at the next global batch
    assert len(moved) == 2 and all(torch.equal(moved[i], reference[2 + i]) for i in range(2))
    for run in (straight, load(runs["other"] / "checkpoints" / "last.ckpt")):
        a, b = run["state_dict"], load(runs["one"] / "checkpoints" / "last.ckpt")["state_dict"]
        slow = [k for k in b if ".memory.memory." not in k and b[k].is_floating_point()]
        assert max((a[k] - b[k]).abs().max().item() for k in slow) < 1e-2
    # the same validation loss within tolerance: Adam's first steps and the averaged fast-weight writes
    # (mean of per-rank N_read-scaled steps, not one write of the global batch) are not bitwise the same
    losses = [float(re.search(r"final val\s+loss (\S+)", out).group(1)) for out in (out_one, other.stdout)]
    assert abs(losses[0] - losses[1]) < 2e-3, losses


# --------------------------------------------------------------------------- in-process pieces


@pytest.fixture
def micro_module(micro_training):
    """micro_module(**kwargs): the Lightning module of the micro model."""
    from lit.config import resolve_model
    from lit.module import FwPKMLitModule

    model = resolve_model(micro_training.overrides, vocab_size=264)[1]
    return lambda **kwargs: FwPKMLitModule(model=model, **kwargs)


def micro_data():
    from lit.data import FwPKMDataModule

    return FwPKMDataModule(seq_len=32, batch_size=4, max_documents=200)


def micro_trainer(tmp_path, callbacks=(), **kwargs):
    options = dict(accelerator="cpu", devices=1, max_steps=4, val_check_interval=2, check_val_every_n_epoch=None,
                   limit_val_batches=2, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    options.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **options)


class ValidationWatch(Callback):
    """Records the memory when validation starts (callbacks run before the module's hooks),
    after validation's writes, and once validation is over."""

    def __init__(self):
        self.before, self.during, self.after = [], [], []

    def on_validation_epoch_start(self, trainer, pl_module):
        self.before.append(pl_module.model.fast_weight_state())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.during.append(pl_module.model.fast_weight_state())

    def on_validation_end(self, trainer, pl_module):
        self.after.append(pl_module.model.fast_weight_state())


def test_validation_leaves_the_training_memory_unchanged(micro_module, tmp_path):
    torch.manual_seed(0)
    module, watch = micro_module(), ValidationWatch()
    trainer = micro_trainer(tmp_path, [watch])
    trainer.fit(module, datamodule=micro_data())
    assert len(watch.before) == len(watch.after) == 2  # after steps 2 and 4
    for before, during, after in zip(watch.before, watch.during[::2], watch.after):
        changed = [k for k in before if not torch.equal(before[k], during[k])]
        assert changed, "validation should write into the memory (otherwise this test proves nothing)"
        assert_same_state(before, after, atol=0)
    state = module.model.fast_weight_state()
    for _ in range(2):  # Trainer.validate runs under inference mode
        trainer.validate(module, datamodule=micro_data(), verbose=False)
        assert_same_state(state, module.model.fast_weight_state(), atol=0)


def test_fast_weights_persist_across_steps_and_stay_out_of_the_optimizer(micro_module, tmp_path):
    from lit.module import parameter_groups

    module = micro_module()
    initial = module.model.fast_weight_state()
    trainer = micro_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=micro_data())
    after = module.model.fast_weight_state()
    assert any(not torch.equal(initial[k], after[k]) for k in initial)
    buffers = {id(b) for m in module.model.fast_weight_memories().values() for b in m.buffers()}
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert buffers and not buffers & in_optimizer
    groups = {g["name"]: g for g in parameter_groups(module.model, 0.1)}
    names = {id(p): n for n, p in module.model.named_parameters()}
    no_decay = [names[id(p)] for p in groups["no_decay"]["params"]]
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert any("norm" in n for n in no_decay) and any(n.endswith("bias") for n in no_decay)
    assert any(n.endswith("A_log") for n in no_decay) and any(n.endswith("dt_bias") for n in no_decay)
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])


def test_learning_rate_schedule_and_fa_to_swa_coin():
    from lit.module import OptimConfig, fa_to_swa_coin, lr_factor

    o = OptimConfig(lr=3e-4, min_lr=3e-5, warmup_steps=10)
    assert lr_factor(0, o, 100) == pytest.approx(0.1)
    assert lr_factor(9, o, 100) == pytest.approx(1.0)
    assert lr_factor(10, o, 100) == pytest.approx(1.0)
    assert lr_factor(55, o, 100) == pytest.approx((3e-5 + 2.7e-4 * 0.5) / 3e-4)
    assert lr_factor(100, o, 100) == pytest.approx(0.1) == lr_factor(500, o, 100)
    coins = [fa_to_swa_coin(0, s, 0.9) for s in range(2000)]
    assert coins == [fa_to_swa_coin(0, s, 0.9) for s in range(2000)]  # a pure function of (seed, step)
    assert 0.87 < sum(coins) / len(coins) < 0.93
    assert not any(fa_to_swa_coin(0, s, 0.0) for s in range(100))


class BreakLossAt(Callback):
    """Makes the loss of optimizer step ``step`` NaN by poisoning that batch's embeddings."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        model = pl_module.model
        if trainer.global_step == self.step:
            self.saved = model.embed.weight.detach().clone()
            with torch.no_grad():
                model.embed.weight.fill_(float("nan"))
        elif hasattr(self, "saved"):
            with torch.no_grad():
                model.embed.weight.copy_(self.saved)
            del self.saved


class MemoryAt(Callback):
    def __init__(self):
        self.states = []  # (batch skipped?, memory after the batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        skipped = pl_module.skipped_batches > sum(was_skipped for was_skipped, _ in self.states)
        self.states.append((skipped, pl_module.model.fast_weight_state()))


def test_nan_loss_stops_with_step_and_layer_statistics(micro_module, tmp_path):
    from lit.module import NonFiniteLossError

    trainer = micro_trainer(tmp_path, [BreakLossAt(2)], limit_val_batches=0)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(micro_module(), datamodule=micro_data())
    message = str(info.value)
    assert "global step 2" in message and "layer 1:" in message and "mem_loss=" in message
    assert "nan_policy skip" in message


def test_nan_loss_skip_policy_drops_the_batch_and_restores_the_memory(micro_module, tmp_path):
    module, memory = micro_module(train={"nan_policy": "skip"}), MemoryAt()
    trainer = micro_trainer(tmp_path, [BreakLossAt(2), memory], max_steps=4, limit_val_batches=0)
    trainer.fit(module, datamodule=micro_data())
    assert module.skipped_batches == 1
    skipped = [i for i, (was_skipped, _) in enumerate(memory.states) if was_skipped]
    assert skipped == [2]
    assert_same_state(memory.states[1][1], memory.states[2][1], atol=0)  # the bad batch left no trace
    assert not all(torch.equal(memory.states[2][1][k], memory.states[3][1][k]) for k in memory.states[2][1])
    assert trainer.global_step == 4  # the skipped batch made no optimizer step; training went on
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(torch.isfinite(t).all() for t in module.model.fast_weight_state().values())


# --------------------------------------------------------------------------- command line


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    from ablations.__main__ import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_and_print_config(capsys, tmp_path):
    code, out, _ = cli(capsys, "--help")
    assert code == 0 and "train" in out
    code, out, _ = cli(capsys, "train", "--help")
    assert code == 0 and "--run_dir" in out and "mlflow ui" in out and "--optim.lr" in out
    assert "--model.block.memory.addr_loss_weight" in out
    code, out, _ = cli(capsys, "train", "--print_config", "--model.preset", "tiny-gdn-fwpkm",
                      "--model.block.memory.addr_loss_weight", "0.1", "--trainer.max_steps", "7")
    import yaml

    config = yaml.safe_load(out)
    assert code == 0 and config["model"]["preset"] == "tiny-gdn-fwpkm"
    assert config["model"]["block"]["memory"]["addr_loss_weight"] == 0.1
    assert config["model"]["mixers"] == ["gdn"] * 4  # the preset's, not the default preset's
    assert config["trainer"]["max_steps"] == 7 and config["data"]["source"] == "embedded"
    path = tmp_path / "c.yaml"
    path.write_text(out)
    code, again, _ = cli(capsys, "train", "--config", str(path), "--print_config")
    assert code == 0 and yaml.safe_load(again) == config


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(capsys, config):
    code, out, err = cli(capsys, "train", "--config", str(config), "--print_config")
    assert code == 0, err
    import yaml

    from fwpkm import preset_names

    parsed = yaml.safe_load(out)
    assert parsed["model"]["preset"] in preset_names() + ["tiny", "paper"]


@pytest.mark.parametrize("args, message", [
    (["--data.source", "/nonexistent/corpus.jsonl"], "does not exist"),
    (["--data.source", "nosuchdataset"], "neither a known source"),
    (["--data.source", "hf:no-such-org/no-such-dataset"], "could not be loaded"),
    (["--data.tokenizer", "/nonexistent/tokenizer"], "could not be loaded"),
    (["--model.preset", "tiny-nosuchmixer"], "unknown mixers"),
    (["--model.block.memory.no_such_option", "1"], "unknown option model.block.memory.no_such_option; "
                                                    "allowed under model.block.memory: k_dim, v_dim, chunk_size"),
    (["--model.block.memory.topk", "100"], "memory.topk=100 must be <= memory.n_subkeys=32"),
    (["--model.overrides", '{"block.memory.topk": 4}'], "model options are ordinary options now"),
    (["--train.nan_policy", "ignore"], "nan_policy"),
    (["--trainer.no_such_option", "1"], "no_such_option"),
])
def test_bad_inputs_fail_clearly_before_training(capsys, tmp_path, monkeypatch, args, message):
    for module, name in (("datasets.config", "HF_HUB_OFFLINE"), ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        if module in sys.modules:  # imported before the CLI could switch them offline
            monkeypatch.setattr(sys.modules[module], name, True)
    run_dir = tmp_path / "runs" / "bad"
    code, out, err = cli(capsys, "train", "--run_dir", str(run_dir), *args)
    assert code != 0
    assert message in out + err, out + err
    assert not (run_dir / "checkpoints").exists()


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(micro_training, capsys, tmp_path):
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"this is not a checkpoint")
    base = ["train", "--run_dir", str(run_dir), *micro_training.args, "--tracking.enabled", "false"]
    code, out, err = cli(capsys, *base, "--trainer.max_steps", "1")
    assert code == 1 and "cannot be loaded safely" in err and "corrupt" in err

    (run_dir / "checkpoints" / "last.ckpt").unlink()
    code, out, err = cli(capsys, *base, "--trainer.max_steps", "1", "--trainer.num_sanity_val_steps", "0")
    assert code == 0, err
    code, out, err = cli(capsys, *base, "--trainer.max_steps", "2", "--model.d_model", "48")
    assert code == 1 and "different model" in err and "d_model" in err


def test_allocator_settings(capsys, monkeypatch):
    from ablations import __main__ as cli
    from lit import runtime

    glibc = runtime._glibc() is not None
    assert runtime.tune_allocator("tuned") is glibc  # applied wherever the C library is glibc
    assert runtime.tune_allocator("default") is False
    with pytest.raises(ValueError, match=r"'fast'.*\('tuned', 'default'\)"):
        runtime.tune_allocator("fast")
    monkeypatch.setenv(runtime.MALLOC_ENV, "fast")
    assert cli.main(["report", "--help"]) == 2
    assert "FWPKM_MALLOC='fast': expected one of ('tuned', 'default')" in capsys.readouterr().err


# --------------------------------------------------------------------------- the run config


def test_options_and_files_merge_field_by_field_over_the_preset(capsys, tmp_path):
    """A file's model options survive a command-line model option (they used to be replaced
    wholesale by --model.overrides), and both apply over the preset named in either place."""
    import yaml

    path = tmp_path / "my.yaml"
    path.write_text("model:\n  preset: tiny-gdn-fwpkm\n  d_model: 32\n  block:\n    memory: {topk: 4}\n"
                    "optim: {lr: 0.002}\n")
    code, out, err = cli(capsys, "train", "--config", str(path), "--model.block.memory.addr_loss_weight", "0.1",
                         "--optim.warmup_steps", "7", "--print_config")
    assert code == 0, err
    config = yaml.safe_load(out)
    memory = config["model"]["block"]["memory"]
    assert config["model"]["d_model"] == 32 and memory["topk"] == 4 and memory["addr_loss_weight"] == 0.1
    assert config["model"]["mixers"] == ["gdn"] * 4 and memory["n_subkeys"] == 32  # from the file's preset
    assert config["optim"] == {**config["optim"], "lr": 0.002, "warmup_steps": 7}
    code, out, err = cli(capsys, "train", "--config", str(path), "--model.preset", "tiny-fa-fwpkm", "--print_config")
    config = yaml.safe_load(out)
    assert code == 0 and config["model"]["mixers"] == ["fa"] * 4 and config["model"]["d_model"] == 32

    # a file with a bad model path, or in the old format, fails in one line naming the option
    for text, message in [("model:\n  block:\n    memory: {topkk: 3}\n",
                           "error: unknown option model.block.memory.topkk; allowed under model.block.memory:"),
                          ("model:\n  preset: tiny\n  overrides: {d_model: 32}\n",
                           "error: model.overrides is no longer an option: model options are ordinary options")]:
        path.write_text(text)
        code, out, err = cli(capsys, "train", "--config", str(path), "--print_config")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_run_config_resolves_checks_and_hashes():
    from fwpkm import preset
    from fwpkm.config import ConfigError
    from lit.config import RunConfig

    nested = RunConfig.from_dict({"model": {"preset": "tiny", "block": {"memory": {"topk": 4}}}, "optim": {"lr": 1e-3}})
    dotted = RunConfig.from_dict({"model.preset": "tiny", "model.block.memory.topk": 4, "optim.lr": 1e-3})
    assert nested == dotted and nested.hash() == dotted.hash()
    assert nested.model.block.memory.topk == 4 and nested.model.d_model == preset("tiny").d_model
    assert nested.model.vocab_size == 264  # the byte tokenizer's
    assert nested.model_options == {"block.memory.topk": 4}
    assert RunConfig.from_dict(nested.to_dict()) == nested
    other = RunConfig.from_dict({"model.block.memory.topk": 4, "optim.lr": 1e-3, "trainer.max_steps": 50})
    assert other.experiment_hash() == nested.experiment_hash() and other.hash() != nested.hash()
    assert RunConfig.from_dict({"model.block.memory.topk": 2}).experiment_hash() != nested.experiment_hash()
    for bad, message in [({"model.block.memory.topkk": 4}, "unknown option model.block.memory.topkk; allowed under "
                                                            "model.block.memory: k_dim, v_dim, chunk_size"),
                         ({"model.overrides": {"d_model": 32}}, "model options are ordinary options now"),
                         ({"model.optim.lr": 1e-3}, "top-level now: optim"),
                         ({"optim.nosuch": 1}, "unknown option(s) optim.nosuch; allowed under optim: lr, min_lr"),
                         ({"trainer.max_step": 5}, "unknown option(s) trainer.max_step; allowed under trainer:"),
                         ({"modle.d_model": 3}, "unknown section(s) modle; allowed: seed_everything, run_dir, model"),
                         ({"model.preset": "tiny-nosuch"}, "unknown mixers")]:
        with pytest.raises(ConfigError) as err:
            RunConfig.from_dict(bad)
        assert message in str(err.value)


def test_the_weighted_loss_is_the_models_loss_at_weight_one_and_weighs_each_label():
    from lit.module import weighted_loss

    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    labels[0, 1] = -100
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert torch.allclose(weighted_loss(logits, labels, torch.ones(2, 5)), plain, atol=1e-6)
    weights = torch.ones(2, 5)
    weights[1, 3] = 5.0
    ce = torch.nn.functional.cross_entropy(logits[1, 3:4], labels[1, 3:4])
    assert torch.allclose(weighted_loss(logits, labels, weights), plain + 4.0 * ce / 9, atol=1e-6)  # 9 labels count


def _train_on_facts(micro_module, tmp_path, **data_options) -> tuple[dict, dict]:
    """(weights, callback metrics) of the micro model after 2 steps on rows half of which are fact rows."""
    from lit.data import FwPKMDataModule

    torch.manual_seed(0)
    module = micro_module()
    data = FwPKMDataModule(seq_len=128, batch_size=4, max_documents=200, facts_fraction=0.5, **data_options)
    trainer = micro_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return {k: v.clone() for k, v in module.model.state_dict().items()}, trainer.callback_metrics


def test_training_on_weighted_answers_follows_the_weighted_loss(micro_module, tmp_path):
    """data.facts_answer_weight: the step optimises the weighted loss (other weights, other weights of the
    model), and train/loss is still the plain mean."""
    (plain, plain_metrics), (heavy, heavy_metrics) = [_train_on_facts(micro_module, tmp_path, facts_answer_weight=w)
                                                      for w in (1.0, 8.0)]
    assert "train/weighted_loss" in heavy_metrics and "train/weighted_loss" not in plain_metrics
    assert heavy_metrics["train/weighted_loss"] > heavy_metrics["train/loss"]  # the answers are the hard tokens
    assert any(not torch.equal(plain[k], heavy[k]) for k in plain if plain[k].is_floating_point())


def test_the_query_loss_is_the_cross_entropy_of_finding_the_source_among_earlier_positions():
    """lit.module.query_loss against a direct computation: per layer, -log softmax over the positions before
    the reader of cos(q_reader, q_t) / tau at the source, weighted per row, averaged over pairs and layers;
    queries that point at their source give ~0, and the gradient reaches the queries."""
    from types import SimpleNamespace

    from lit.module import QUERY_TEMPERATURE, query_loss

    torch.manual_seed(0)
    queries = [torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    memory = {1: SimpleNamespace(queries=queries[0]), 3: SimpleNamespace(queries=queries[1])}
    pairs = torch.full((2, 4, 2), -1)
    pairs[0, :2] = torch.tensor([[5, 1], [6, 2]])
    pairs[1, 0] = torch.tensor([3, 0])
    weights = torch.tensor([[2.0], [0.5]])
    expected = 0.0
    for q in queries:
        q = torch.nn.functional.normalize(q, dim=-1)
        for (b, r, s), w in zip([(0, 5, 1), (0, 6, 2), (1, 3, 0)], (2.0, 2.0, 0.5)):
            logits = (q[b, :r] @ q[b, r]) / QUERY_TEMPERATURE
            expected = expected + w * -torch.log_softmax(logits, 0)[s] / 3
    loss = query_loss(memory, pairs, weights)
    assert torch.allclose(loss, expected / 2)
    loss.backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in queries)
    aligned = torch.eye(7, dtype=torch.float64)[None, :, :6].repeat(1, 1, 1)  # 7 positions, 6 directions
    aligned[0, 5] = aligned[0, 1]  # the reader at 5 points where its source (1) points
    found = query_loss({0: SimpleNamespace(queries=aligned)}, torch.tensor([[[5, 1]]]), torch.ones(1, 1))
    assert float(found) < 1e-3
    assert float(query_loss(memory, torch.full((2, 4, 2), -1), weights)) == 0.0


def test_training_with_the_query_loss_adds_it_and_changes_the_model(micro_module, tmp_path):
    """data.facts_query_weight: fact rows carry (reader, source) pairs whose tokens are the same recalled value
    token; the step adds the query loss (logged as train/query_loss) and trains another model than without it."""
    from lit.data import FwPKMDataModule
    from lit.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    data = FwPKMDataModule(seq_len=128, batch_size=8, max_documents=200, facts_fraction=0.5, facts_query_weight=1.0)
    batch = next(iter(data.train_dataloader()))
    readers, sources = batch["query_pairs"][..., 0], batch["query_pairs"][..., 1]
    has = readers >= 0
    assert has.any() and ((batch["query_weight"][:, 0] > 0) == has.any(1)).all()
    b, k = has.nonzero(as_tuple=True)
    labels = batch["labels"]
    assert torch.equal(labels[b, readers[b, k]], labels[b, sources[b, k]])  # the same value token
    assert (sources[b, k] < readers[b, k]).all() and not (batch["query_pairs"][~has] >= 0).any()
    assert tok.decode(labels[b[0], readers[b[0], k[0]]:readers[b[0], k[0]] + 1].tolist())
    (plain, plain_metrics), (pulled, pulled_metrics) = [_train_on_facts(micro_module, tmp_path, facts_query_weight=w)
                                                        for w in (0.0, 1.0)]
    assert "train/query_loss" in pulled_metrics and "train/query_loss" not in plain_metrics
    assert float(pulled_metrics["train/query_loss"]) > 0
    assert any(not torch.equal(plain[k], pulled[k]) for k in plain if plain[k].is_floating_point())
    from lit.data import DataConfig
    with pytest.raises(Exception, match="facts_query_weight"):
        DataConfig(facts_query_weight=-1.0)
