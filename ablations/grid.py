"""Ablation grids as data, and the runs they resolve to.

A grid file (``ablations/grids/<name>.yaml``, or any path) holds::

    name: tiny                    # default: the file name
    description: ...
    extends: smoke                # optional: start from another grid (base merged, variants added)
    experiment: fwpkm-ablations   # MLflow experiment of the grid's runs
    seeds: [0]
    base:                         # a `fwpkm train` run config (what --config takes; lit.config)
      model: {preset: tiny, d_model: 64}
      optim: {...}
      data: {...}
      trainer: {...}
    variants:                     # name -> overrides of the base (the order is the table's order)
      base: {}
      dot: {model.block.memory.score: dot}
      fwmlp: {model.preset: tiny-swa_interleave-pkm-fwmlp}
      h1k8: {same_as: base}       # an alias: no run, its row repeats the named variant
      fwmlp_2: {seeds: [0, 1], model.block.kind: fwmlp}   # this variant's own seeds (default: the grid's)
    eval:
      niah: {context_lens: [256], iterations: [0, 2]}   # lit.evaluation.niah.NIAHConfig
    tune: {...}                   # the Optuna study of `fwpkm tune` (see ablations.tune)

Override keys are dotted paths into the run config (``trainer.max_steps``, ``optim.lr``,
``model.block.memory.score``); nested mappings are merged field by field, not replaced, so
``model.block.memory.score: dot`` and ``model: {block: {memory: {score: dot}}}`` mean the same
thing (``lit.config.merge``). A variant's ``model.preset`` changes the starting point of the
model; the base's other model options still apply over it.

A run is (variant, seed): the base with the variant's overrides and ``seed_everything``.
Its identity is :meth:`lit.config.RunConfig.hash` of that config (the model resolved, without
run folder and tracking options): the runner skips a run already FINISHED with the same hash.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import yaml

from ablations import GRIDS_DIR
from fwpkm.config import ConfigError
from lit.config import RunConfig, leaves, merge

GRID_KEYS = ("name", "description", "extends", "experiment", "seeds", "base", "variants", "eval", "tune")
DEFAULT_EXPERIMENT = "fwpkm-ablations"
ALIAS_KEY = "same_as"
SEEDS_KEY = "seeds"  # a variant's own seeds
EVALUATIONS = ("niah", "mqar", "ppl")  # a grid's eval sections (the runner evaluates each finished run)


class GridError(ValueError):
    """An invalid grid file or option; the message names the grid and the key."""


def apply(config: dict, overrides: Optional[dict]) -> dict:
    """A copy of ``config`` with ``overrides`` merged in field by field."""
    try:
        return merge(config, overrides)
    except ConfigError as err:
        raise GridError(str(err)) from err


def parse_sets(items: Iterable[str]) -> dict:
    """``["trainer.max_steps=100", "model.block.memory.score=dot"]`` -> overrides
    (values parsed as YAML: numbers, null, true, lists, mappings)."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise GridError(f"--set {item!r}: expected KEY=VALUE, e.g. trainer.max_steps=100")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise GridError(f"--set {item!r}: empty key")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise GridError(f"--set {item!r}: the value is not valid YAML ({err})") from err
    return out


# --------------------------------------------------------------------------- grid files


@dataclass
class Grid:
    name: str
    path: Optional[Path]
    base: dict
    variants: dict  # name -> overrides (insertion order = table order)
    aliases: dict = field(default_factory=dict)  # name -> variant it repeats
    seeds: list = field(default_factory=lambda: [0])
    variant_seeds: dict = field(default_factory=dict)  # name -> its own seeds, where not the grid's
    eval: dict = field(default_factory=dict)
    tune: dict = field(default_factory=dict)
    experiment: str = DEFAULT_EXPERIMENT
    description: str = ""

    @property
    def order(self) -> list[str]:
        """Variant and alias names in file order."""
        return list(self._order)

    _order: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        variants = {}
        for name in self._order:
            variants[name] = {ALIAS_KEY: self.aliases[name]} if name in self.aliases else self.variants[name]
            if name in self.variant_seeds:
                variants[name] = {SEEDS_KEY: list(self.variant_seeds[name]), **variants[name]}
        return {"name": self.name, "description": self.description, "experiment": self.experiment,
                "seeds": list(self.seeds), "base": self.base, "variants": variants, "eval": self.eval,
                "tune": self.tune}


def grid_names() -> list[str]:
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))


def grid_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise GridError(f"grid file {str(candidate)!r} does not exist")
        return candidate
    shipped = GRIDS_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise GridError(f"unknown grid {name_or_path!r}: not a file and not one of the shipped grids {grid_names()}")


def load_grid(name_or_path: str, _seen: tuple = ()) -> Grid:
    """Read and check a grid (name of a shipped grid or a YAML path), following ``extends``."""
    path = grid_path(str(name_or_path))
    if path.resolve() in _seen:
        raise GridError(f"grid {str(path)!r}: 'extends' forms a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise GridError(f"grid {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise GridError(f"grid {str(path)!r} must be a mapping with keys {list(GRID_KEYS)}")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"grid {str(path)!r}: unknown key(s) {unknown}; allowed: {list(GRID_KEYS)}")
    name = str(data.get("name") or path.stem)
    parent = None
    if data.get("extends"):
        ref = str(data["extends"])
        if not Path(ref).is_absolute() and (path.parent / ref).is_file():
            ref = str(path.parent / ref)
        parent = load_grid(ref, _seen + (path.resolve(),))

    base = apply(parent.base if parent else {}, data.get("base") or {})
    variants: dict = {}
    aliases: dict = {}
    variant_seeds: dict = {}
    order: list = []
    if parent:
        variants.update(copy.deepcopy(parent.variants))
        aliases.update(parent.aliases)
        variant_seeds.update(parent.variant_seeds)
        order.extend(parent.order)
    raw_variants = data.get("variants")
    if raw_variants is None and parent is None:
        raw_variants = {"base": {}}
    if not isinstance(raw_variants or {}, dict):
        raise GridError(f"grid {name!r}: 'variants' must map names to overrides")
    for vname, overrides in (raw_variants or {}).items():
        vname = str(vname)
        _check_name(name, vname)
        if vname in order:
            order.remove(vname)
        variants.pop(vname, None)
        aliases.pop(vname, None)
        variant_seeds.pop(vname, None)
        if overrides is False:  # `name: false` in a child grid drops an inherited variant
            continue
        order.append(vname)
        if isinstance(overrides, dict) and ALIAS_KEY in overrides:
            if len(overrides) != 1:
                raise GridError(f"grid {name!r}, variant {vname!r}: '{ALIAS_KEY}' cannot be combined with overrides")
            aliases[vname] = str(overrides[ALIAS_KEY])
            continue
        if overrides is not None and not isinstance(overrides, dict):
            raise GridError(f"grid {name!r}, variant {vname!r}: overrides must be a mapping, got {overrides!r}")
        overrides = dict(overrides or {})
        if SEEDS_KEY in overrides:
            variant_seeds[vname] = _seeds(f"{name}, variant {vname}", overrides.pop(SEEDS_KEY))
        variants[vname] = apply({}, overrides)  # syntax check now
    for alias, target in aliases.items():
        if target not in variants:
            raise GridError(f"grid {name!r}: variant {alias!r} is '{ALIAS_KEY}: {target}', which is not a variant")
    if not variants:
        raise GridError(f"grid {name!r} has no variants")

    seeds = data.get("seeds", parent.seeds if parent else [0])
    seeds = _seeds(name, seeds)
    ev = copy.deepcopy(data["eval"]) if "eval" in data else (copy.deepcopy(parent.eval) if parent else {})
    tune = copy.deepcopy(parent.tune) if parent else {}
    if data.get("tune"):
        tune = {**tune, **copy.deepcopy(data["tune"])}
    unknown_eval = sorted(set(ev or {}) - set(EVALUATIONS))
    if unknown_eval:
        raise GridError(f"grid {name!r}: unknown eval(s) {unknown_eval}; known: {list(EVALUATIONS)}")
    if "niah" in ev:
        _check_niah(name, ev["niah"])
    experiment = str(data.get("experiment") or (parent.experiment if parent else DEFAULT_EXPERIMENT))
    grid = Grid(name=name, path=path, base=base, variants=variants, aliases=aliases, seeds=seeds,
                variant_seeds=variant_seeds, eval=ev or {},
                tune=tune or {}, experiment=experiment, description=str(data.get("description") or ""))
    grid._order = order
    return grid


def _check_niah(grid: str, options) -> None:
    """eval.niah is checked when the grid loads, not after its first run has trained."""
    from lit.evaluation.niah import NIAHConfig

    if not isinstance(options, dict):
        raise GridError(f"grid {grid!r}: eval.niah must be a mapping of NIAH options, got {options!r}")
    try:
        NIAHConfig(**{k: v for k, v in options.items() if k != "haystack"})
    except TypeError as err:
        raise GridError(f"grid {grid!r}: eval.niah: {err}; allowed: the fields of lit.evaluation.niah.NIAHConfig") from None
    except ValueError as err:
        raise GridError(f"grid {grid!r}: eval.{err}") from None


def _check_name(grid: str, variant: str) -> None:
    if not variant or any(c in variant for c in "/\\ \t\n'\"`") or variant.startswith("."):
        raise GridError(f"grid {grid!r}: variant name {variant!r} must be a plain folder name (no '/', quotes, spaces)")


def _seeds(grid: str, seeds) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, (list, tuple)) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise GridError(f"grid {grid!r}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise GridError(f"grid {grid!r}: duplicate seeds {seeds}")
    return list(seeds)


# --------------------------------------------------------------------------- runs


@dataclass
class RunSpec:
    """One (variant, seed) of a grid, resolved and checked."""

    grid: str
    variant: str
    seed: int
    config: dict  # the run config as the grid writes it (without run_dir)
    overrides: dict  # the variant's own overrides (for printing)
    run_dir: Path
    config_hash: str  # RunConfig.hash(): the run's identity
    experiment_hash: str  # RunConfig.experiment_hash(): a different value needs a fresh run folder
    error: Optional[str] = None  # why the config is invalid
    summary: dict = field(default_factory=dict)  # the resolved model's main options

    @property
    def key(self) -> str:
        return f"{self.grid}/{self.variant}/seed{self.seed}"


def grid_dir(runs_dir: Path, grid: str) -> Path:
    return Path(runs_dir) / "ablations" / grid


def resolve_runs(grid: Grid, runs_dir: Path, only: Optional[Iterable[str]] = None,
                 seeds: Optional[Iterable[int]] = None, sets: Optional[dict] = None) -> list[RunSpec]:
    """Every (variant, seed) run of ``grid``: base + ``sets`` (command-line overrides of the base)
    + the variant's overrides + ``seed_everything``, each checked as ``fwpkm train`` will."""
    only = list(only or [])
    unknown = [v for v in only if v not in grid.variants and v not in grid.aliases]
    if unknown:
        raise GridError(f"grid {grid.name!r} has no variant(s) {unknown}; variants: {grid.order}")
    wanted = [v for v in grid.order if v in grid.variants and (not only or v in only)]
    wanted += [grid.aliases[a] for a in only if a in grid.aliases and grid.aliases[a] not in wanted]
    seeds = _seeds(grid.name, list(seeds)) if seeds else None  # --seeds: the same for every variant
    base = apply(grid.base, sets or {})
    base.pop("run_dir", None)
    specs = []
    for variant in wanted:
        for seed in seeds or grid.variant_seeds.get(variant, grid.seeds):
            config = apply(base, grid.variants[variant])
            config["seed_everything"] = int(seed)
            config.pop("run_dir", None)
            specs.append(resolve_run(grid.name, variant, int(seed), config, grid.variants[variant],
                                     grid_dir(runs_dir, grid.name) / variant / f"seed{seed}"))
    return specs


def resolve_run(grid: str, variant: str, seed: int, config: dict, overrides: dict, run_dir: Path) -> RunSpec:
    """A :class:`RunSpec` with its hashes, or with ``error`` set when the config is invalid."""
    spec = RunSpec(grid=grid, variant=variant, seed=seed, config=config, overrides=overrides, run_dir=run_dir,
                   config_hash="invalid", experiment_hash="invalid")
    try:
        run = RunConfig.from_dict(config)
        check_grid_run(run)
    except Exception as err:  # every kind of bad value must become a readable per-run error
        spec.error = f"{type(err).__name__}: {err}"
        return spec
    spec.config_hash, spec.experiment_hash = run.hash(), run.experiment_hash()
    spec.summary = summary(run)
    return spec


def check_grid_run(run: RunConfig) -> None:
    """What a grid needs beyond a valid run: a final validation loss to compare."""
    from lit.cli import trainer_defaults

    trainer = {**trainer_defaults(), **run.trainer}
    max_steps, interval = trainer.get("max_steps"), trainer.get("val_check_interval")
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise ConfigError(f"trainer.max_steps={max_steps!r} must be a positive number of steps")
    if (trainer.get("check_val_every_n_epoch") is None and isinstance(interval, int) and not isinstance(interval, bool)
            and interval > 0 and max_steps % interval):
        raise ConfigError(f"trainer.max_steps={max_steps} must be a multiple of trainer.val_check_interval={interval} "
                          "so that the run ends with a validation (its final val loss is the grid's result)")
    if trainer.get("limit_val_batches") == 0:
        raise ConfigError("trainer.limit_val_batches=0 leaves no validation loss to compare")


def summary(run: RunConfig) -> dict:
    """The resolved model's main options (the ``--dry-run`` listing)."""
    model, trainer = run.model, run.trainer
    block, mem = model.block, model.block.memory
    kind = block.kind if model.memory_layers else "none"
    out = {
        "preset": run.preset, "layers": model.n_layers, "d_model": model.d_model,
        "mixers": "".join(m[0] for m in model.mixers), "pkm": model.pkm_layers,
        "memory": kind, "memory_layers": model.memory_layers,
        "max_steps": trainer.get("max_steps"), "seq_len": run.data.seq_len, "batch": run.data.batch_size,
        "fa_to_swa": run.train.fa_to_swa_prob if run.train.fa_to_swa_prob is not None else model.fa_to_swa_prob,
    }
    if kind == "fwpkm":
        out.update({"score": mem.score, "lookahead": mem.lookahead, "target_norm": block.target_norm,
                    "addr_loss": mem.addr_loss_weight, "values_only": mem.grad_to_values_only,
                    "gate_out": block.out_fuse_gate, "gate_loss": block.weight_loss_with_gates,
                    "HxK": f"{mem.heads}x{mem.topk}" + (f" (training: {mem.train_topk})" if mem.train_topk else ""),
                    "mse": mem.mse, "slots": mem.n_slots})
    elif kind == "fwmlp":
        out.update({"lookahead": block.fwmlp.lookahead, "hidden": block.fwmlp.hidden,
                    "gate_out": block.out_fuse_gate, "gate_loss": block.weight_loss_with_gates})
    return out


# --------------------------------------------------------------------------- printing


def describe(grid: Grid, specs: list[RunSpec]) -> str:
    """The ``--dry-run`` listing: one line per run with its hash, folder and resolved options."""
    lines = [f"grid {grid.name!r} ({grid.path}): {len(specs)} run(s), experiment {grid.experiment!r}, seeds {grid.seeds}"]
    if grid.description:
        lines.append("  " + grid.description.strip().replace("\n", "\n  "))
    if grid.eval:
        lines.append(f"  eval: {json.dumps(grid.eval, sort_keys=True)}")
    base = specs[0].config if specs else grid.base
    lines.append("  base: " + _brief(base))
    width = max([len(s.variant) for s in specs] + [7])
    for spec in specs:
        status = "ok     " if spec.error is None else "INVALID"
        lines.append(f"  {status} {spec.variant:<{width}} seed={spec.seed} hash={spec.config_hash} -> {spec.run_dir}")
        over = json.dumps(dict(leaves(spec.overrides)), sort_keys=True, default=str) if spec.overrides else "(base)"
        lines.append(f"          overrides: {over}")
        if spec.error is None:
            lines.append("          resolved: " + ", ".join(f"{k}={v}" for k, v in spec.summary.items()))
        else:
            lines.append(f"          error: {spec.error}")
    for alias, target in grid.aliases.items():
        lines.append(f"  alias   {alias:<{width}} = {target} (no run of its own)")
    bad = [s for s in specs if s.error]
    lines.append(f"{len(specs) - len(bad)} valid, {len(bad)} invalid")
    return "\n".join(lines)


def _brief(config: dict) -> str:
    model = config.get("model", {})
    trainer = config.get("trainer", {})
    data = config.get("data", {})
    options = len([k for k, _ in leaves(model) if k != "preset"])
    return (f"preset={model.get('preset')} model options={options} "
            f"data={data.get('source', 'embedded')}/{data.get('tokenizer', 'byte')} seq_len={data.get('seq_len')} "
            f"batch={data.get('batch_size')} max_steps={trainer.get('max_steps')} "
            f"val_every={trainer.get('val_check_interval')}")

