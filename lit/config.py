"""The typed configuration of a training run, used by ``fwpkm train``, grids, studies and evaluation.

A run config has these sections (a YAML file, a grid's ``base``, ``fwpkm train --print_config``)::

    seed_everything: 0
    run_dir: null                 # default runs/<preset>-<hash of model, optim, train, data, seed>
    model:                        # a preset (the starting point) and any ModelConfig option over it
      preset: tiny
      d_model: 64
      block: {memory: {topk: 16}}
    optim: {lr: 1.0e-3}           # OptimConfig
    train: {nan_policy: stop}     # TrainConfig
    data: {seq_len: 256}          # lit.data.DataConfig
    checkpoint: {every_n_steps: 100}
    tracking: {experiment: fwpkm}
    trainer: {max_steps: 600}     # keyword arguments of lightning.Trainer

Sources merge field by field, left to right: the preset, YAML files, grid variants and
command-line options. A dotted key (``model.block.memory.topk: 16``) means the nested one.
:meth:`RunConfig.from_dict` checks every key and value and raises :class:`ConfigError` with
one line naming the option and the allowed names or values.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from fwpkm import ModelConfig
from fwpkm import preset as make_preset
from fwpkm.config import ConfigError, check_choice, from_mapping

DEFAULT_PRESET = "tiny"
NAN_POLICIES = ("stop", "skip")
DDP_FAST_WEIGHT_POLICIES = ("mean", "local")
# keys of earlier versions of the run config, with what replaced them
MOVED = {
    "model.overrides": "model options are ordinary options now: write them under model, e.g. "
                       "--model.block.memory.topk 32 or model: {block: {memory: {topk: 32}}}",
    "model.optim": "the optimizer section is top-level now: optim (e.g. --optim.lr 1e-3)",
    "model.train": "the training-behaviour section is top-level now: train (e.g. --train.nan_policy skip)",
    "model.config": "a complete model config goes under model itself",
    "model.seed": "the seed is seed_everything",
}


# --------------------------------------------------------------------------- sections


@dataclass
class OptimConfig:
    """AdamW and its schedule (spec section 6: peak 3e-4 decayed to 3e-5, wd 0.1, warm-up 100).

    Args:
        lr: peak learning rate, reached at the end of the warm-up.
        min_lr: the cosine decays to this.
        warmup_steps: optimizer steps of linear warm-up (from lr/warmup_steps).
        decay_steps: step at which the cosine reaches min_lr; null = trainer.max_steps.
        weight_decay: AdamW weight decay, on matrices only (not on norms, biases, A_log, dt_bias).
        betas: AdamW betas.
        eps: AdamW epsilon.
        grad_clip: maximum global gradient norm; null or 0 = no clipping
            (trainer.gradient_clip_val wins when set).
    """

    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    decay_steps: Optional[int] = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: Optional[float] = 1.0

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"optim.lr={self.lr} must be > 0 and optim.min_lr={self.min_lr} in [0, lr]")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise ConfigError(f"optim.decay_steps={self.decay_steps} must be > 0 or None (= trainer.max_steps)")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip={self.grad_clip} must be >= 0 or None")


@dataclass
class TrainConfig:
    """Training behaviour that is not the optimizer.

    Args:
        fa_to_swa_prob: probability that a training step runs full attention as sliding-window
            attention of the memory chunk size (FA->SWA, paper: 0.9); null = the model config's value.
        nan_policy: on a NaN/Inf loss or gradient: "stop" raises with the step and the per-layer
            memory statistics; "skip" drops the batch (no update, fast-weight memory restored).
        plot_every_n_steps: gate histograms and slot-usage plots every this many steps; 0 = never.
        ddp_fast_weights: with several ranks: "mean" averages the fast-weight memory over the ranks
            after every step (identical memory everywhere, coherent checkpoints); "local" keeps it
            per rank (checkpoints hold rank 0's).
        max_skipped_fraction: with nan_policy "skip": the run fails once more batches than this
            fraction of trainer.max_steps (at least 1) have been skipped.
    """

    fa_to_swa_prob: Optional[float] = None
    nan_policy: str = "stop"
    plot_every_n_steps: int = 100
    ddp_fast_weights: str = "mean"
    max_skipped_fraction: float = 0.1

    def __post_init__(self):
        if self.fa_to_swa_prob is not None and not 0.0 <= self.fa_to_swa_prob <= 1.0:
            raise ConfigError(f"train.fa_to_swa_prob={self.fa_to_swa_prob} must be in [0, 1] or None")
        check_choice("train.nan_policy", self.nan_policy, NAN_POLICIES)
        check_choice("train.ddp_fast_weights", self.ddp_fast_weights, DDP_FAST_WEIGHT_POLICIES)
        if self.plot_every_n_steps < 0:
            raise ConfigError(f"train.plot_every_n_steps={self.plot_every_n_steps} must be >= 0")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ConfigError(f"train.max_skipped_fraction={self.max_skipped_fraction} must be in [0, 1]")


@dataclass
class CheckpointConfig:
    """Checkpoints in ``<run_dir>/checkpoints``.

    Args:
        every_n_steps: refresh last.ckpt every this many optimizer steps (it is also written at the end).
        save_best: keep best.ckpt, the checkpoint with the best monitored value seen at validation.
        monitor: metric for best.ckpt; val/ppl is the perplexity of the first validation set.
        mode: "min" or "max" for the monitor.
    """

    every_n_steps: int = 100
    save_best: bool = True
    monitor: str = "val/ppl"
    mode: str = "min"

    def __post_init__(self):
        if self.every_n_steps < 1:
            raise ConfigError(f"checkpoint.every_n_steps={self.every_n_steps} must be >= 1")
        check_choice("checkpoint.mode", self.mode, ("min", "max"))


@dataclass
class TrackingConfig:
    """MLflow tracking of a run.

    Args:
        enabled: log the run to MLflow (false: no logger).
        uri: tracking URI; null = $MLFLOW_TRACKING_URI, else sqlite:///<runs folder>/mlflow.db
            (the runs folder is the parent of the run folder).
        experiment: MLflow experiment name.
        variant: the run's "variant" tag; null = "base" for a preset as it is, else "custom".
        tags: extra tags, e.g. {"team": "memory"}.
        system_metrics_s: seconds between MLflow system metrics (CPU, memory, disk, network; GPU with
            nvidia-ml-py), as ``system/*`` on the run; 0 = none.
    """

    enabled: bool = True
    uri: Optional[str] = None
    experiment: str = "fwpkm"
    variant: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)
    system_metrics_s: float = 10.0


# --------------------------------------------------------------------------- dotted paths


def expand(mapping: Optional[dict]) -> dict:
    """A nested copy of ``mapping`` in which every dotted key is a path: ``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict = {}
    for key, value in (mapping or {}).items():
        set_path(out, str(key), expand(value) if isinstance(value, dict) else copy.deepcopy(value))
    return out


def set_path(config: dict, path: str, value: Any) -> None:
    """Set one dotted path in place; a mapping value is merged into the mapping already there."""
    *parents, leaf = path.split(".")
    node = config
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {path}: {'.'.join(parents[:i + 1])} is {child!r}, not a section")
        node = child
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        node[leaf] = merge(node[leaf], value)
    else:
        node[leaf] = copy.deepcopy(value)


def merge(base: Optional[dict], overrides: Optional[dict]) -> dict:
    """``base`` with ``overrides`` merged in field by field (mappings merged, other values replaced)."""
    out = expand(base)
    for key, value in expand(overrides).items():
        set_path(out, key, value)
    return out


def leaves(mapping: Optional[dict], prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted path, value)`` of every non-mapping value (an empty mapping counts as a value)."""
    out = []
    for key, value in expand(mapping).items():
        path = f"{prefix}.{key}" if prefix else key
        out.extend(leaves(value, path) if isinstance(value, dict) and value else [(path, value)])
    return out


# --------------------------------------------------------------------------- the model section


def resolve_model(section: Optional[dict], vocab_size: Optional[int] = None) -> tuple[str, ModelConfig]:
    """(preset name, ModelConfig): the preset's config with the section's other options merged in and
    ``vocab_size`` (the tokenizer's) set."""
    section = expand(section)
    for key in sorted(section):
        if f"model.{key}" in MOVED:
            raise ConfigError(f"model.{key} is no longer an option: {MOVED[f'model.{key}']}")
    name = str(section.pop("preset", None) or DEFAULT_PRESET)
    if vocab_size is not None:
        given = section.get("vocab_size")
        if given is not None and int(given) != int(vocab_size):
            raise ConfigError(f"model.vocab_size={given} disagrees with the tokenizer's vocab_size={vocab_size}; "
                              "drop it (the vocabulary comes from data.tokenizer)")
        section["vocab_size"] = int(vocab_size)
    check_paths(ModelConfig, section, "model")
    return name, ModelConfig.from_dict(merge(make_preset(name).to_dict(), section))


def check_paths(cls, section: dict, option: str) -> None:
    """Every key of ``section`` is a field of dataclass ``cls`` (recursively into nested dataclasses)."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in section.items():
        if key not in known:
            raise ConfigError(f"unknown option {option}.{key}; allowed under {option}: {', '.join(known)}")
        default = _default_of(known[key])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            check_paths(type(default), value, f"{option}.{key}")


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


MISSING = "<missing>"  # the value of a path one side of a comparison does not have


def changed_paths(before: dict, after: dict) -> list[str]:
    """The dotted paths whose values differ between two (nested) configs, sorted; a tuple equals its list."""
    a, b = dict(leaves(before)), dict(leaves(after))
    return [k for k in sorted(set(a) | set(b)) if _plain(a.get(k, MISSING)) != _plain(b.get(k, MISSING))]


def model_options(config: ModelConfig, preset: str) -> dict:
    """The options of ``config`` that differ from its preset's, as dotted paths (the run's "overrides")."""
    options = dict(leaves(config.to_dict()))
    return {k: options[k] for k in changed_paths(make_preset(preset).to_dict(), options) if k != "vocab_size"}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------- the run config


SECTIONS = ("seed_everything", "run_dir", "model", "optim", "train", "data", "checkpoint", "tracking", "trainer")
HASH_EXCLUDED = ("run_dir", "tracking")  # where a run lives and is logged is not what it is
EXPERIMENT_SECTIONS = ("model", "optim", "train", "data", "seed_everything")  # what its checkpoint holds


@dataclass
class RunConfig:
    """One training run, typed: see the module docstring for the sections."""

    preset: str = DEFAULT_PRESET
    model: ModelConfig = field(default_factory=lambda: make_preset(DEFAULT_PRESET))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: Any = None  # lit.data.DataConfig (imported lazily: it pulls in torch and datasets)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    trainer: dict = field(default_factory=dict)  # lightning.Trainer keyword arguments
    seed_everything: int = 0
    run_dir: Optional[str] = None

    @classmethod
    def from_dict(cls, data: Optional[dict], vocab_size: Optional[int] = None) -> "RunConfig":
        """Build and check a run config from a (nested or dotted, possibly partial) mapping. The model's
        vocabulary is ``vocab_size``, else the byte tokenizer's when ``data.tokenizer`` is ``byte``,
        else the preset's (other tokenizers are loaded only where the run trains)."""
        from lit.data import DataConfig

        data = expand(data)
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section(s) {', '.join(unknown)}; allowed: {', '.join(SECTIONS)}")
        data_config = from_mapping(DataConfig, data.get("data"), "data")
        if vocab_size is None and data_config.tokenizer == "byte":
            vocab_size = _byte_vocab_size()
        name, model = resolve_model(data.get("model"), vocab_size)
        seed = data.get("seed_everything", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) and seed is not None:
            raise ConfigError(f"seed_everything={seed!r} must be an integer")
        trainer = data.get("trainer") or {}
        if not isinstance(trainer, dict):
            raise ConfigError(f"trainer must be a mapping of lightning.Trainer options, got {trainer!r}")
        check_trainer_options(trainer)
        run_dir = data.get("run_dir")
        return cls(preset=name, model=model, optim=from_mapping(OptimConfig, data.get("optim"), "optim"),
                   train=from_mapping(TrainConfig, data.get("train"), "train"), data=data_config,
                   checkpoint=from_mapping(CheckpointConfig, data.get("checkpoint"), "checkpoint"),
                   tracking=from_mapping(TrackingConfig, data.get("tracking"), "tracking"),
                   trainer=dict(trainer), seed_everything=int(seed or 0),
                   run_dir=None if run_dir is None else str(run_dir))

    def to_dict(self) -> dict:
        """The config as plain data (``from_dict(to_dict())`` gives it back); the model complete."""
        out = {"seed_everything": self.seed_everything, "run_dir": self.run_dir,
               "model": {"preset": self.preset, **self.model.to_dict()}}
        for name in ("optim", "train", "data", "checkpoint", "tracking"):
            out[name] = dataclasses.asdict(getattr(self, name))
        out["trainer"] = copy.deepcopy(self.trainer)
        return out

    def hash(self) -> str:
        """12 hex digits of everything but the run folder and tracking: a run's identity in a grid."""
        return _digest({k: v for k, v in self.to_dict().items() if k not in HASH_EXCLUDED})

    def experiment_hash(self) -> str:
        """12 hex digits of what a checkpoint holds (model, optimizer, training behaviour, data, seed),
        not of the trainer's length or logging: a longer run of the same experiment has the same one."""
        full = self.to_dict()
        return _digest({k: full[k] for k in EXPERIMENT_SECTIONS})

    def default_run_dir(self, runs: str = "runs") -> str:
        return f"{runs}/{self.preset}-{self.experiment_hash()[:8]}"

    @property
    def model_options(self) -> dict:
        """The model options that differ from the preset's (dotted)."""
        return model_options(self.model, self.preset)


def _digest(data: dict) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- YAML that reads back as written

# what some YAML loader (PyYAML's 1.1 resolver, YAML 1.2, jsonargparse's) may read as a number or a constant
_NUMBER_LIKE = re.compile(r"[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][-+]?\d+)?|[-+]?\.?(inf|nan)|0[xXoObB][\da-fA-F_]+",
                          re.IGNORECASE)


def _must_quote(text: str) -> bool:
    import yaml

    if "\n" in text:
        return False
    if _NUMBER_LIKE.fullmatch(text.strip()):
        return True
    try:
        return not isinstance(yaml.safe_load(text), str)
    except yaml.YAMLError:
        return False


def dump_yaml(data: Any, **options) -> str:
    """``yaml.safe_dump`` in which every string that any YAML loader could read as another type
    (``552743e64060``, ``1e5``, ``inf``, ``0x10``, ``yes``) is quoted: strings stay strings through
    every round trip (config hashes, tags, run names)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def represent_str(dumper, value):
        style = "'" if _must_quote(value) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, represent_str)
    options.setdefault("sort_keys", False)
    return yaml.dump(data, Dumper=Dumper, **options)


def _byte_vocab_size() -> int:
    from lit.tokenizer import ByteTokenizer

    return ByteTokenizer().vocab_size


def check_trainer_options(trainer: dict) -> None:
    """Every key is a keyword argument of ``lightning.Trainer``."""
    import inspect

    from lightning.pytorch import Trainer

    known = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    unknown = sorted(set(trainer) - set(known))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join('trainer.' + k for k in unknown)}; allowed under trainer: "
                          f"{', '.join(known)}")
