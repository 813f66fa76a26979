"""The ``fwpkm`` command line.

    fwpkm train [--config FILE.yaml] [--print_config] [--model.preset tiny] [--trainer.max_steps 600] ...
    fwpkm <subcommand> --help

Subcommands live in :data:`SUBCOMMANDS` (name -> function taking the remaining arguments and
returning an exit code); other modules add theirs with :func:`register`. ``train`` is built
on ``LightningCLI`` (YAML config files, ``--print_config``, dotted overrides).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from lit.runtime import tune_allocator

SUBCOMMANDS: dict[str, Callable[[list[str]], Optional[int]]] = {}


def register(name: str, fn: Callable[[list[str]], Optional[int]]) -> None:
    """Add a subcommand: ``fn(argv)`` gets the arguments after the name and returns an exit code
    (None = 0). The first line of its docstring is its summary in ``fwpkm --help``."""
    SUBCOMMANDS[name] = fn


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _load_plugins()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"fwpkm: error: unknown subcommand {name!r}; choose one of {sorted(SUBCOMMANDS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    try:
        tune_allocator()  # before any tensor exists: freed blocks are kept for reuse (lit/runtime.py)
    except ValueError as err:
        print(f"fwpkm: error: {err}", file=sys.stderr)
        return 2
    code = SUBCOMMANDS[name](rest)
    return 0 if code is None else int(code)


def _usage() -> str:
    lines = ["usage: fwpkm <subcommand> [options]   (fwpkm <subcommand> --help for its options)", "",
             "Fast-weight Product Key Memory: training and evaluation.", "", "subcommands:"]
    for name, fn in sorted(SUBCOMMANDS.items()):
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        lines.append(f"  {name:<10} {summary}")
    return "\n".join(lines)


PLUGIN_MODULES = ("ablations.cli", "lit.evaluation.cli")


def _load_plugins() -> None:
    """Import the modules that register further subcommands (each calls :func:`register` when
    imported); a module that does not exist is skipped, one that fails to import is reported."""
    import importlib

    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is not None and module.startswith(err.name):
                continue  # not written (yet)
            print(f"fwpkm: warning: subcommands of {module} unavailable: {err}", file=sys.stderr)
        except Exception as err:  # a broken plugin must not take `fwpkm train` down with it
            print(f"fwpkm: warning: subcommands of {module} unavailable: {type(err).__name__}: {err}",
                  file=sys.stderr)


# =========================================================================== train


@dataclass
class CheckpointConfig:
    """Checkpoints in ``<run_dir>/checkpoints``.

    Args:
        every_n_steps: refresh last.ckpt every this many optimizer steps (it is also written at the end).
        save_best: keep best.ckpt, the checkpoint with the best monitored value seen at validation.
        monitor: metric for best.ckpt; val/ppl is the perplexity of the first validation set.
        mode: "min" or "max" for the monitor.
    """

    every_n_steps: int = 100  # refresh last.ckpt every this many optimizer steps (and at the end)
    save_best: bool = True  # keep best.ckpt, the lowest monitor value seen at validation
    monitor: str = "val/ppl"  # perplexity of the first validation set
    mode: str = "min"

    def __post_init__(self):
        from fwpkm.config import ConfigError, check_choice

        if self.every_n_steps < 1:
            raise ConfigError(f"checkpoint.every_n_steps={self.every_n_steps} must be >= 1")
        check_choice("checkpoint.mode", self.mode, ("min", "max"))


TRAIN_DESCRIPTION = """\
Train a hybrid FwPKM language model (Lightning + MLflow).

Every option can come from a YAML file (--config configs/tiny.yaml; several files and
command-line options merge left to right) and be overridden with dotted options, e.g.
  --model.preset tiny-gdn-fwpkm --model.overrides '{"block.memory.addr_loss_weight": 0.1}'
  --model.optim.lr 1e-3 --data.seq_len 512 --trainer.max_steps 2000
--print_config prints the resolved configuration (a valid --config file) and exits.

Run folder (--run_dir, default runs/<preset>-<hash of the model/data/optimizer options>):
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
memory averaged over ranks after every step, see --model.train.ddp_fast_weights).
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


def _seed_of(seed: Any) -> int:
    return 0 if isinstance(seed, bool) or seed is None else int(seed)


def _make_cli_class():
    """Defined lazily so that ``fwpkm --help`` does not import Lightning."""
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from lit.data import DataConfig
    from lit.module import FwPKMLitModule
    from lit.tracking import TrackingConfig

    class TrainCLI(LightningCLI):
        """LightningCLI without Lightning's subcommands: parse, build, then :func:`train` runs ``fit``."""

        def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_lightning_class_args(self.trainer_class, "trainer")
            parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
            parser.add_class_arguments(self._model_class, "model", fail_untyped=False, sub_configs=True,
                                       skip={"config"})
            parser.add_class_arguments(DataConfig, "data", help="Training and validation data (lit.data.DataConfig)")

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument("--run_dir", type=Optional[str], default=None,
                                help="Run folder (checkpoints, config, plots); default runs/<preset>-<hash>. "
                                     "Re-running with the same folder resumes from its last checkpoint.")
            parser.add_class_arguments(TrackingConfig, "tracking", help="MLflow tracking (lit.tracking)")
            parser.add_class_arguments(CheckpointConfig, "checkpoint", help="Checkpoints")
            parser.link_arguments("data.tokenizer", "model.vocab_size", compute_fn=_vocab_size_of)
            parser.link_arguments("seed_everything", "model.seed", compute_fn=_seed_of)

        def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
            self.config = parser.parse_args(args)  # no warning about sys.argv: argv is ours

        def before_instantiate_classes(self) -> None:
            self.config.model.seed = _seed_of(self.config.seed_everything)  # the seed actually used

        def instantiate_classes(self) -> None:
            from lit.data import FwPKMDataModule

            instantiate = getattr(self.parser, "instantiate", None) or self.parser.instantiate_classes
            self.config_init = instantiate(self.config)
            self.datamodule = FwPKMDataModule(_as_data_config(self.config_init.data))
            self.model = self.config_init.model
            self.trainer = None  # built by train(): it needs the run folder and the logger

    return TrainCLI


def _as_data_config(value):
    from lit.data import DataConfig

    if isinstance(value, DataConfig):
        return value
    if dataclasses.is_dataclass(value):
        return DataConfig(**dataclasses.asdict(value))
    return DataConfig.from_dict(dict(value))


def _plain(value: Any) -> Any:
    """A parsed config (jsonargparse Namespace, dataclasses) as plain dicts/lists."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def default_run_name(config: dict) -> str:
    """``<preset>-<8 hex>``: a digest of the options that define the experiment (model, optimizer,
    data, seed), not of the trainer's length or logging, so a longer run resumes the same folder."""
    keyed = {k: config.get(k) for k in ("model", "data", "seed_everything")}
    digest = hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:8]
    preset = str(config.get("model", {}).get("preset", "run"))
    return f"{preset}-{digest}"


def train(argv: list[str]) -> int:
    """Train a model (Lightning CLI: YAML config, --print_config, dotted overrides)."""
    from fwpkm.config import ConfigError
    from lit.module import CheckpointError, NonFiniteLossError

    state = {"fitting": False}
    try:
        return _train(argv, state)
    except SystemExit as exit_:  # jsonargparse: --help, --print_config, parse errors (message printed)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except (CheckpointError, NonFiniteLossError) as err:
        print(f"fwpkm train: error: {err}", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, ValueError) as err:
        if state["fitting"] and not isinstance(err, ConfigError):
            raise  # a bug during training: keep the traceback
        print(f"fwpkm train: error: {err}", file=sys.stderr)
        return 2


def _train(argv: list[str], state: dict) -> int:
    from lit.callbacks import LastCheckpoint, MemoryPlots, best_checkpoint
    from lit.module import check_checkpoint_matches, load_checkpoint
    from lit.tracking import TrackingCallback, flat_params, make_logger, run_tags

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    for offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # no network at run time: fail fast, no retries
        os.environ.setdefault(offline, "1")
    cli_class = _make_cli_class()
    cli = cli_class(
        datamodule_class=None,
        model_class=_module_class(),
        save_config_callback=None,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,
        parser_kwargs={"prog": "fwpkm train", "description": TRAIN_DESCRIPTION,
                       "formatter_class": _formatter()},
        args=argv,
        run=False,
        auto_configure_optimizers=False,
        load_from_checkpoint_support=False,
    )
    config = cli.config
    plain = _plain(config)
    plain.pop("config", None)  # the --config file list
    run_dir = Path(config.run_dir or Path("runs") / default_run_name(plain))
    plain["run_dir"] = str(run_dir)
    module, datamodule = cli.model, cli.datamodule
    datamodule.setup("fit")  # bad sources, files, tokenizers fail here, before any training

    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    resume = last if last.is_file() else None
    if resume is not None:  # fail now, with a clear message, rather than inside Lightning
        check_checkpoint_matches(load_checkpoint(str(resume)), module, source=f"checkpoint {str(resume)!r}")

    is_rank_zero = int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    artifacts = []
    if is_rank_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        artifacts = _write_config_files(cli, config, run_dir, module)

    tracking = config_init_get(cli, "tracking")
    variant = tracking.variant or ("base" if not module.overrides else "custom")
    tags = run_tags(module.preset, variant, module.seed, run_dir, tracking.tags)
    callbacks, loggers = [], []
    if tracking.enabled:
        logger = make_logger(tracking, run_dir, run_name=run_dir.name, tags=tags)
        loggers.append(logger)
        params = flat_params({**plain, "model": {**plain["model"], "config": module.model_config.to_dict()}})
        callbacks.append(TrackingCallback(str(run_dir), params, tags, [str(p) for p in artifacts]))
    ckpt = config_init_get(cli, "checkpoint")
    if cli.config_init.trainer.get("enable_checkpointing") is not False:
        callbacks.append(LastCheckpoint(str(ckpt_dir), ckpt.every_n_steps))
        if ckpt.save_best:
            callbacks.append(best_checkpoint(str(ckpt_dir), ckpt.monitor, ckpt.mode))
    if module.train_config.plot_every_n_steps:
        callbacks.append(MemoryPlots(str(run_dir / "plots"), module.train_config.plot_every_n_steps))

    trainer = _build_trainer(cli, callbacks, loggers, run_dir)
    _warn_unsharded_data(trainer, datamodule)
    state["fitting"] = True
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    if trainer.is_global_zero:
        done = f"trained to step {trainer.global_step}; checkpoints in {ckpt_dir}"
        if loggers:
            done += f"; MLflow run {loggers[0].run_id} at {loggers[0]._tracking_uri}"
        print(f"[fwpkm] {done}")
    return 0


def _warn_unsharded_data(trainer, datamodule) -> None:
    if trainer.world_size > 1 and not getattr(datamodule, "shards_by_rank", False) and trainer.is_global_zero:
        import warnings

        warnings.warn(f"{trainer.world_size} ranks read the same training batches: the data module does not "
                      "shard its resumable sampler by rank (and Lightning's DistributedSampler is off because it "
                      "would lose the data position). Training is correct but not faster per sample.",
                      stacklevel=2)


def _module_class():
    from lit.module import FwPKMLitModule

    return FwPKMLitModule


def config_init_get(cli, key: str):
    return cli.config_init[key]


def _formatter():
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        def _fill_text(self, text, width, indent):  # keep the description's line breaks
            return "".join(indent + line + "\n" for line in text.splitlines())

    return Formatter


def _write_config_files(cli, config, run_dir: Path, module) -> list[Path]:
    """``config.yaml`` (re-runnable: ``fwpkm train --config run_dir/config.yaml``) and the resolved
    ``model_config.yaml``; a changed config.yaml is kept as ``config.previous.yaml``."""
    import yaml

    dumped = cli.parser.dump(config, skip_unset=False, skip_link_targets=True)
    data = yaml.safe_load(dumped)
    data.pop("config", None)
    data["run_dir"] = str(run_dir)
    text = yaml.safe_dump(data, sort_keys=False)
    path = run_dir / "config.yaml"
    if path.is_file() and path.read_text() != text:
        path.replace(run_dir / "config.previous.yaml")
    path.write_text(text)
    model_path = run_dir / "model_config.yaml"
    model_path.write_text(yaml.safe_dump(module.model_config.to_dict(), sort_keys=False))
    return [path, model_path]


def _build_trainer(cli, callbacks: list, loggers: list, run_dir: Path):
    from lightning.pytorch import Trainer

    config = dict(cli.config_init.trainer)
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
    return Trainer(**config)


register("train", train)


if __name__ == "__main__":  # python -m lit.cli: run the importable module, where plugins register
    from lit.cli import main as _main

    sys.exit(_main())
