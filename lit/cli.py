"""``fwpkm train``: parse a :class:`lit.config.RunConfig` from YAML files and options, then fit.

    fwpkm train [--config FILE.yaml] [--print_config] [--model.preset tiny] [--model.d_model 64]
                [--optim.lr 1e-3] [--trainer.max_steps 600] ...

The parser is Lightning's (``LightningArgumentParser``: YAML config files, ``--print_config``,
dotted options, every Trainer option under ``--trainer``). Model options are ordinary options
(``--model.block.memory.topk 16``); ``--model.preset`` names their starting point: the preset's
values are the defaults that files and options then change field by field.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

from lit.config import (DEFAULT_PRESET, MISSING, CheckpointConfig, OptimConfig, RunConfig, TrackingConfig,
                        TrainConfig, changed_paths, dump_yaml, leaves)

STOPPED_BY_SIGTERM = 143  # 128 + SIGTERM, as a shell reports a process the signal ended

TRAIN_DESCRIPTION = """\
Train a hybrid FwPKM language model (Lightning + MLflow).

Every option can come from a YAML file (--config configs/tiny.yaml; several files and
command-line options merge left to right, field by field) and be set with dotted options, e.g.
  --model.preset tiny-gdn-fwpkm --model.block.memory.addr_loss_weight 0.1 --model.d_model 64
  --optim.lr 1e-3 --data.seq_len 512 --trainer.max_steps 2000
--model.preset is the model's starting point: its values are the defaults of every --model.*
option (shown below for the default preset, tiny). --print_config prints the resolved
configuration (a valid --config file) and exits.

Run folder (--run_dir, default runs/<preset>-<hash of the model, optim, train, data options and seed>):
checkpoints/last.ckpt (every --checkpoint.every_n_steps steps and at the end),
checkpoints/best.ckpt (best val/ppl), config.yaml, model_config.yaml, plots/ and
mlflow_run_id. Running the same command again resumes from last.ckpt: weights, optimizer,
scheduler, fast-weight memory, data position and RNG, logging into the same MLflow run.

Tracking: MLflow, by default in sqlite:///<runs folder>/mlflow.db (the runs folder is the
parent of the run folder); set MLFLOW_TRACKING_URI (or --tracking.uri) for a team server.
Browse with: mlflow ui --backend-store-uri sqlite:///runs/mlflow.db

Default job: the tiny preset on the embedded corpus (byte tokenizer, 256 tokens x 8 rows,
600 steps): a few minutes on a 2-core CPU. Precision: bf16-mixed on a GPU with bf16,
32-true otherwise. Multi-device: --trainer.strategy ddp --trainer.devices N (fast-weight
memory averaged over ranks after every step, see --train.ddp_fast_weights).
"""


def _default_precision() -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def trainer_defaults() -> dict:
    return {
        "max_steps": 600,
        "val_check_interval": 200,  # optimizer steps between validations (with check_val_every_n_epoch=None)
        "check_val_every_n_epoch": None,
        "log_every_n_steps": 1,
        "precision": _default_precision(),
        "num_sanity_val_steps": 2,
        # the DataModule's resumable sampler owns the order and the data position; Lightning's
        # DistributedSampler wrapper would hide that position (see _warn_unsharded_data)
        "use_distributed_sampler": False,
    }


def _vocab_size_of(tokenizer: str) -> int:
    from lit.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer).vocab_size


# --------------------------------------------------------------------------- parsing


def build_parser():
    """The ``fwpkm train`` parser: one section per part of the run config."""
    from jsonargparse import ActionConfigFile
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    from fwpkm import ModelConfig
    from lit.data import DataConfig

    parser = LightningArgumentParser(prog="fwpkm train", description=TRAIN_DESCRIPTION, formatter_class=_formatter(),
                                     exit_on_error=False, allow_abbrev=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile,
                        help="a YAML run config (several merge left to right)")
    parser.add_argument("--seed_everything", type=int, default=0, help="seed of the weights, data order and FA->SWA coin")
    parser.add_argument("--run_dir", type=Optional[str], default=None,
                        help="Run folder (checkpoints, config, plots); default runs/<preset>-<hash>. "
                             "Re-running with the same folder resumes from its last checkpoint.")
    parser.add_argument("--model.preset", type=str, default=DEFAULT_PRESET,
                        help="the model's starting point (fwpkm.preset_names(): SCALE-MIXERS[-pkm][-fwpkm|-fwmlp])")
    parser.add_class_arguments(ModelConfig, "model", help="The model (fwpkm.ModelConfig) over its preset")
    parser.add_class_arguments(OptimConfig, "optim", help="AdamW and its schedule (lit.config.OptimConfig)")
    parser.add_class_arguments(TrainConfig, "train", help="Training behaviour (lit.config.TrainConfig)")
    parser.add_class_arguments(DataConfig, "data", help="Training and validation data (lit.data.DataConfig)")
    parser.add_class_arguments(CheckpointConfig, "checkpoint", help="Checkpoints")
    parser.add_class_arguments(TrackingConfig, "tracking", help="MLflow tracking")
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.set_defaults({"trainer." + k: v for k, v in trainer_defaults().items()})
    parser.link_arguments("data.tokenizer", "model.vocab_size", compute_fn=_vocab_size_of)
    _set_model_defaults(parser, DEFAULT_PRESET)
    return parser


def _set_model_defaults(parser, preset: str) -> None:
    from fwpkm import preset as make_preset

    values = dict(leaves(make_preset(preset).to_dict()))
    values.pop("vocab_size")  # a link target: it comes from data.tokenizer
    parser.set_defaults({f"model.{k}": v for k, v in values.items()})


def _preset_given(parser, argv: list[str]) -> Optional[str]:
    """The ``model.preset`` that files and options name (None if they cannot be parsed yet)."""
    from argparse import ArgumentError

    probe = [a for a in argv if a not in ("-h", "--help") and not a.startswith("--print_config")]
    try:
        return parser.parse_args(probe).model.preset
    except (ArgumentError, SystemExit, ValueError, TypeError):
        return None  # the real parse reports it


def parse_run_config(argv: list[str]):
    """(RunConfig, parser, parsed namespace) of ``fwpkm train`` arguments."""
    parser = build_parser()
    preset = _preset_given(parser, argv)
    if preset and preset != DEFAULT_PRESET:
        _set_model_defaults(parser, preset)
    namespace = parser.parse_args(argv)
    plain = namespace.clone()
    if "config" in plain:
        del plain["config"]
    plain = plain.as_dict()
    return RunConfig.from_dict(plain, vocab_size=plain["model"]["vocab_size"]), parser, namespace


def _trainer_objects(parser, namespace) -> dict:
    """The trainer section with its callbacks, loggers and plugins instantiated."""
    cleaned = namespace.clone()
    del cleaned["model.preset"]  # not a ModelConfig field: the parser would pass it to ModelConfig
    return dict(parser.instantiate(cleaned).trainer)


# =========================================================================== train


def train(argv: list[str]) -> int:
    """Train a model (YAML run configs, --print_config, dotted options; re-running resumes)."""
    from argparse import ArgumentError

    from fwpkm.config import ConfigError
    from lit.callbacks import CheckpointSaveError
    from lit.module import CheckpointError, NonFiniteLossError
    from lit.tracking import FolderLockedError

    state = {"fitting": False}
    try:
        return _train(argv, state)
    except SystemExit as exit_:  # --help, --print_config
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except ArgumentError as err:
        print(f"fwpkm train: error: {explain_argument_error(err)}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteLossError, CheckpointSaveError, FolderLockedError) as err:
        print(f"fwpkm train: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, ValueError) as err:
        if state["fitting"] and not isinstance(err, ConfigError):
            raise  # a bug during training: keep the traceback
        print(f"fwpkm train: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        cause = disk_full_cause(err)
        if cause is None:
            raise
        print(f"fwpkm train: error: no space left on the disk ({cause}); {state.get('checkpoint_note', '')}"
              "free some space and run the same command again to resume", file=sys.stderr)
        return 1


def disk_full_cause(err: BaseException) -> Optional[str]:
    """The one-line cause when ``err`` (or an exception it was raised from) is a full disk, else None."""
    import errno

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = " ".join(str(err).split())
        if getattr(err, "errno", None) == errno.ENOSPC or "disk is full" in text or "No space left" in text:
            return f"{type(err).__name__}: {text[:300]}"
        err = err.__cause__ or err.__context__
    return None


def explain_argument_error(err) -> str:
    """jsonargparse's message on one line; an unknown dotted option names the allowed ones."""
    import re

    from fwpkm.config import ConfigError

    message = " ".join(str(err).split())
    unknown = re.search(r"unrecognized arguments: --([\w.]+)", message)
    in_group = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message)
    path = unknown.group(1) if unknown else f"{in_group.group(1)}.{in_group.group(2)}" if in_group else None
    if path:
        try:
            RunConfig.from_dict(_dotted(path))
        except ConfigError as why:
            return str(why)
    return message


def _dotted(path: str) -> dict:
    """``{"a": {"b": None}}`` for ``a.b``: enough for :meth:`RunConfig.from_dict` to name a bad key."""
    out: dict = {}
    node = out
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = {}
    return out


def _train(argv: list[str], state: dict) -> int:

    from lit.tracking import exclusive_lock

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    for offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # no network at run time: fail fast, no retries
        os.environ.setdefault(offline, "1")
    config, parser, namespace = parse_run_config(argv)
    run_dir = Path(config.run_dir or config.default_run_dir())
    is_rank_zero = int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    if not is_rank_zero:  # rank 0 (the launching process) holds the run folder's lock
        return _fit(config, parser, namespace, run_dir, state, is_rank_zero)
    with exclusive_lock(train_lock_path(run_dir), f"run folder {run_dir}"):
        return _fit(config, parser, namespace, run_dir, state, is_rank_zero)


def train_lock_path(run_dir: Path) -> Path:
    """The lock a `fwpkm train` holds on its run folder for the whole training: ``.<name>.train.lock`` next
    to the folder (so that a bad input fails before the folder is created)."""
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.train.lock"


def _fit(config, parser, namespace, run_dir: Path, state: dict, is_rank_zero: bool) -> int:
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lit.callbacks import (LastCheckpoint, MemoryPlots, RunSummary, StepProgressBar, best_checkpoint,
                               remove_partial_checkpoints)
    from lit.data import FwPKMDataModule
    from lit.module import FwPKMLitModule, check_checkpoint_matches, load_checkpoint
    from lit.tracking import TrackingCallback, flat_params, make_logger, run_tags

    L.seed_everything(config.seed_everything, workers=True)
    module = FwPKMLitModule.from_run_config(config)
    datamodule = FwPKMDataModule(config.data)
    datamodule.setup("fit")  # bad sources, files, tokenizers fail here, before any training
    if config.checkpoint.save_best:
        check_monitor(config.checkpoint.monitor, list(getattr(datamodule, "val_names", None) or ["val"]))

    ckpt_dir = run_dir / "checkpoints"
    if is_rank_zero:
        remove_partial_checkpoints(ckpt_dir)  # of saves that were killed (the folder is locked)
    last = ckpt_dir / "last.ckpt"
    resume = last if last.is_file() else None
    artifacts = []
    if resume is not None:  # fail now, with a clear message, rather than inside Lightning
        checkpoint = load_checkpoint(str(resume))
        check_checkpoint_matches(checkpoint, module, source=f"checkpoint {str(resume)!r}")
        step = int(checkpoint.get("global_step", 0))
        del checkpoint
        if is_rank_zero:
            previous = _resume_decision(parser, namespace, run_dir, step)
            if previous == "finished":
                return 0
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")  # ours, resumed
    if is_rank_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        artifacts = _write_config_files(parser, namespace, run_dir, module)

    tracking = config.tracking
    variant = tracking.variant or ("custom" if config.model_options else "base")
    tags = run_tags(config.preset, variant, config.seed_everything, run_dir, tracking.tags)
    callbacks, loggers = [], []
    if tracking.enabled:
        logger = make_logger(tracking, run_dir, run_name=run_dir.name, tags=tags)
        loggers.append(logger)
        params = flat_params({**config.to_dict(), "run_dir": str(run_dir)})
        callbacks.append(TrackingCallback(str(run_dir), params, tags, [str(p) for p in artifacts],
                                          tracking.system_metrics_s))
    trainer_options = _trainer_objects(parser, namespace)
    ckpt = config.checkpoint
    if trainer_options.get("enable_checkpointing") is not False:
        callbacks.append(LastCheckpoint(str(ckpt_dir), ckpt.every_n_steps))
        if ckpt.save_best:
            callbacks.append(best_checkpoint(str(ckpt_dir), ckpt.monitor, ckpt.mode))
    if config.train.plot_every_n_steps:
        callbacks.append(MemoryPlots(str(run_dir / "plots"), config.train.plot_every_n_steps))
    summary = RunSummary()
    callbacks.append(summary)
    if trainer_options.get("enable_progress_bar") is not False and not _has_progress_bar(trainer_options):
        callbacks.append(StepProgressBar())

    state["checkpoint_note"] = f"the last complete checkpoint is in {ckpt_dir}; "
    trainer = _build_trainer(trainer_options, callbacks, loggers, run_dir)
    _warn_unsharded_data(trainer, datamodule)
    state["fitting"] = True
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    except SIGTERMException:  # Lightning's is a SystemExit with status 0: a stopped run is not a finished one
        print(f"[fwpkm] stopped by SIGTERM at step {trainer.global_step}; {state['checkpoint_note']}the same command "
              "resumes it", file=sys.stderr)
        return STOPPED_BY_SIGTERM
    if trainer.is_global_zero:
        places = {"run folder": str(run_dir), "checkpoints": str(ckpt_dir),
                  "plots": str(run_dir / "plots") if (run_dir / "plots").is_dir() else None}
        if loggers:
            from lit.tracking import browse_hint

            uri = loggers[0]._tracking_uri
            places["MLflow run"] = f"{loggers[0].run_id} (experiment {tracking.experiment})"
            places["look"] = browse_hint(uri, loggers[0].experiment_id, loggers[0].run_id)
        print("\n".join([f"[fwpkm] run finished: {run_dir.name}"] + ["  " + line for line in
                                                                      summary.lines(trainer, places)]))
    return 0


def _has_progress_bar(trainer_options: dict) -> bool:
    from lightning.pytorch.callbacks import ProgressBar

    given = trainer_options.get("callbacks") or []
    return any(isinstance(c, ProgressBar) for c in (given if isinstance(given, list) else [given]))


def check_monitor(monitor: str, val_names: list[str]) -> None:
    """``checkpoint.monitor`` is a metric the run logs at validation (else best.ckpt would fail there)."""
    from fwpkm.config import ConfigError

    allowed = ["val/ppl", *(f"val/{n}/{m}" for n in val_names for m in ("ppl", "loss")), "train/loss"]
    if monitor not in allowed:
        raise ConfigError(f"checkpoint.monitor={monitor!r} is not a metric of this run; allowed: {', '.join(allowed)}")


class RunFolderConflict(ValueError):
    """A run folder's existing run and this command disagree."""


# may change on an existing run folder: a longer resume, or the same run on another device layout (the
# data module continues at the same row of the epoch, or refuses when the new global batch cannot)
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.devices", "trainer.num_nodes", "trainer.strategy", "data.batch_size")
# where the run lives and is logged, and trainer options that only hook into or display it
IGNORED_CHANGES = ("run_dir", "tracking.", "trainer.callbacks", "trainer.logger", "trainer.plugins", "trainer.profiler",
                   "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.default_root_dir")


def _resume_decision(parser, namespace, run_dir: Path, step: int) -> Optional[str]:
    """On a run folder with a checkpoint at ``step``: "finished" (printed) when this command asks for
    nothing more; None to resume. A changed option is refused with the difference named, except a
    larger ``trainer.max_steps`` (an explicit resume with more steps, the previous config kept)."""
    import yaml

    path = run_dir / "config.yaml"
    try:
        before = dict(leaves(yaml.safe_load(path.read_text()) or {}))
    except (OSError, yaml.YAMLError):
        before = None
    now = dict(leaves(_config_data(parser, namespace, run_dir)))
    max_steps = now.get("trainer.max_steps")
    changed = [] if before is None else [k for k in changed_paths(before, now) if not k.startswith(IGNORED_CHANGES)]
    refused = [k for k in changed if k not in RESUMABLE_CHANGES]
    if refused:
        diffs = "; ".join(f"{k}={before.get(k, MISSING)!r} -> {now.get(k, MISSING)!r}" for k in refused[:8])
        raise RunFolderConflict(f"run folder {run_dir} (checkpoint at step {step}) was run with other options: "
                                f"{diffs}; allowed on an existing run folder: the same options, a larger "
                                f"trainer.max_steps (resume for more steps), or another device layout "
                                f"(trainer.devices, trainer.num_nodes, trainer.strategy, data.batch_size); "
                                f"use another --run_dir for a new run")
    if "trainer.max_steps" in changed:
        old = before.get("trainer.max_steps")
        if isinstance(max_steps, int) and isinstance(old, int) and 0 < max_steps < old:
            raise RunFolderConflict(f"trainer.max_steps={max_steps} is smaller than the run folder's "
                                    f"trainer.max_steps={old} (checkpoint at step {step}); allowed: >= {old}")
    finished = isinstance(max_steps, int) and 0 < max_steps <= step
    if changed and not finished:
        kept = run_dir / f"config.step{step}.yaml"
        path.replace(kept)
        diffs = ", ".join(f"{k} {before.get(k, MISSING)} -> {now.get(k, MISSING)}" for k in changed)
        print(f"[fwpkm] resuming {run_dir} from step {step} with {diffs}; the previous config is kept as {kept}")
        return None
    if finished:
        print(f"[fwpkm] run folder {run_dir} already finished at step {step} (trainer.max_steps={max_steps}); "
              "nothing to do (a larger --trainer.max_steps resumes it)")
        return "finished"
    return None


def _warn_unsharded_data(trainer, datamodule) -> None:
    if trainer.world_size > 1 and not getattr(datamodule, "shards_by_rank", False) and trainer.is_global_zero:
        import warnings

        warnings.warn(f"{trainer.world_size} ranks read the same training batches: the data module does not "
                      "shard its resumable sampler by rank (and Lightning's DistributedSampler is off because it "
                      "would lose the data position). Training is correct but not faster per sample.",
                      stacklevel=2)


def _formatter():
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        def _fill_text(self, text, width, indent):  # keep the description's line breaks
            return "".join(indent + line + "\n" for line in text.splitlines())

    return Formatter


def _config_data(parser, namespace, run_dir: Path) -> dict:
    import yaml

    data = yaml.safe_load(parser.dump(namespace, skip_unset=False, skip_link_targets=True))
    data.pop("config", None)
    data["run_dir"] = str(run_dir)
    return data


def _write_config_files(parser, namespace, run_dir: Path, module) -> list[Path]:
    """``config.yaml`` (re-runnable: ``fwpkm train --config run_dir/config.yaml``) and the resolved
    ``model_config.yaml``; a changed config.yaml is kept as ``config.previous.yaml``."""
    text = dump_yaml(_config_data(parser, namespace, run_dir))
    path = run_dir / "config.yaml"
    if path.is_file() and path.read_text() != text:
        path.replace(run_dir / "config.previous.yaml")
    path.write_text(text)
    model_path = run_dir / "model_config.yaml"
    model_path.write_text(dump_yaml(module.model_config.to_dict()))
    return [path, model_path]


def _build_trainer(options: dict, callbacks: list, loggers: list, run_dir: Path):
    from lightning.pytorch import Trainer

    config = dict(options)
    user_callbacks = config.get("callbacks") or []
    if not isinstance(user_callbacks, list):
        user_callbacks = [user_callbacks]
    config["callbacks"] = list(user_callbacks) + callbacks
    user_logger = config.get("logger")
    if user_logger is False:
        config["logger"] = False
    else:
        extra = [] if user_logger in (None, True) else (user_logger if isinstance(user_logger, list) else [user_logger])
        config["logger"] = (list(extra) + loggers) or False
    if config.get("default_root_dir") is None:
        config["default_root_dir"] = str(run_dir)
    config["plugins"] = _with_atomic_checkpoints(config.get("plugins"))
    return Trainer(**config)


def _with_atomic_checkpoints(plugins):
    """The trainer's plugins with :class:`lit.callbacks.AtomicCheckpointIO` added unless one of them is
    already a CheckpointIO (the user's choice wins)."""
    from lightning.fabric.plugins import CheckpointIO

    from lit.callbacks import AtomicCheckpointIO

    plugins = [] if plugins is None else (list(plugins) if isinstance(plugins, (list, tuple)) else [plugins])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


if __name__ == "__main__":  # python -m lit.cli [options] = fwpkm train [options] (how grids and studies start runs)
    from lit.runtime import tune_allocator

    tune_allocator()
    sys.exit(train(sys.argv[1:]))
