"""Typed configuration for every module of the library.

Configuration is data: each dataclass validates itself in ``__post_init__`` and
raises :class:`ConfigError` naming the option and its allowed values. Configs
round-trip through plain dicts (``to_dict`` / ``from_dict``) so they can live in
YAML files, MLflow params and checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional


class ConfigError(ValueError):
    """An invalid configuration value. The message names the option."""


def check_choice(option: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{option}={value!r} is not allowed; choose one of {list(allowed)}")


def check_positive(option: str, value: int | float) -> None:
    if not value > 0:
        raise ConfigError(f"{option}={value!r} must be > 0")


def from_mapping(cls, value: Any, option: str):
    """``cls`` built from ``value`` (None: the defaults; a mapping: its known fields; an instance or
    another dataclass with the same fields: copied); unknown keys raise :class:`ConfigError`
    naming ``option`` and the allowed names."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a mapping of options, got {value!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(f'{option}.{k}' for k in unknown)}; "
                          f"allowed under {option}: {', '.join(known)}")
    return cls(**check_scalar_types(cls, value, option))


_SCALARS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def check_scalar_types(cls, value: dict, option: str) -> dict:
    """``value`` with every field annotated ``int``, ``float``, ``str`` or ``bool`` (or Optional of one)
    checked: a wrong type raises :class:`ConfigError` naming the option, the value and the allowed type
    (a number written as text, ``"1e-3"``, is read as a number for a float field)."""
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation this check does not understand: the dataclass checks itself
        return value
    out = dict(value)
    for key, v in value.items():
        hint, optional = hints.get(key), False
        if typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = len(args) < len(typing.get_args(hint))
            hint = args[0] if len(args) == 1 else None
        if hint not in _SCALARS or (v is None and optional):
            continue
        if hint is float and isinstance(v, str):
            try:
                out[key] = v = float(v)
            except ValueError:
                pass
        ok = {int: isinstance(v, int) and not isinstance(v, bool),
              float: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: isinstance(v, str), bool: isinstance(v, bool) or v in (0, 1)}[hint]
        if not ok:
            allowed = _SCALARS[hint] + (" or null" if optional else "")
            raise ConfigError(f"{option}.{key}={v!r} has the wrong type; allowed: {allowed}")
    return out


@dataclass
class FastWeightConfig:
    """What every fast-weight store has: its key and value sizes, chunked writes with a lookahead,
    and the inner step (learning rate, weight decay, gradient clipping)."""

    OPTION: ClassVar[str] = "fast_weights"  # the option prefix of error messages

    k_dim: int = 512
    v_dim: int = 512
    chunk_size: int = 512
    lookahead: int = 1
    lr: float = 1.0
    weight_decay: float = 0.0
    grad_clip: bool = False

    def __post_init__(self):
        for name in ("k_dim", "v_dim", "chunk_size"):
            check_positive(f"{self.OPTION}.{name}", getattr(self, name))
        if not 0 <= self.lookahead < self.chunk_size:
            raise ConfigError(f"{self.OPTION}.lookahead={self.lookahead} must satisfy "
                              f"0 <= lookahead < chunk_size={self.chunk_size}")
        if self.lr < 0 or self.weight_decay < 0:
            raise ConfigError(f"{self.OPTION}.lr and {self.OPTION}.weight_decay must be >= 0")


@dataclass
class MemoryConfig(FastWeightConfig):
    """The FwPKM memory core (spec section 1)."""

    OPTION: ClassVar[str] = "memory"

    heads: int = 1
    topk: int = 8
    # Not the paper's: slots a read selects while training (reads with a graph), e.g. 32; evaluation reads
    # ``topk``. A wider read gives the outer loss a gradient toward slots just outside the top-k.
    train_topk: Optional[int] = None
    n_subkeys: int = 512
    score: str = "idw"  # idw | dot
    temperature: float = 1.0
    score_fn: str = "softmax"  # softmax | silu | relu
    addr_loss_weight: Optional[float] = 1.0  # None or 0 disables the addressing loss
    grad_to_values_only: bool = True
    mse: str = "sum"  # sum | mean
    backend: str = "auto"  # auto | torch | triton | cpu (kernels for the hot paths)

    def __post_init__(self):
        super().__post_init__()
        for name in ("heads", "topk", "n_subkeys", "temperature"):
            check_positive(f"memory.{name}", getattr(self, name))
        if self.k_dim % 2:
            raise ConfigError(f"memory.k_dim={self.k_dim} must be even (queries are split into two halves)")
        if self.topk > self.n_subkeys:
            raise ConfigError(f"memory.topk={self.topk} must be <= memory.n_subkeys={self.n_subkeys}")
        if self.train_topk is not None and not self.topk <= self.train_topk <= self.n_subkeys:
            raise ConfigError(f"memory.train_topk={self.train_topk} must be null or between memory.topk={self.topk} "
                              f"and memory.n_subkeys={self.n_subkeys}")
        check_choice("memory.score", self.score, ("idw", "dot"))
        check_choice("memory.score_fn", self.score_fn, ("softmax", "silu", "relu"))
        check_choice("memory.mse", self.mse, ("sum", "mean"))
        check_choice("memory.backend", self.backend, ("auto", "torch", "triton", "cpu"))
        if self.addr_loss_weight is not None and self.addr_loss_weight < 0:
            raise ConfigError(f"memory.addr_loss_weight={self.addr_loss_weight} must be >= 0 or None")

    @property
    def n_slots(self) -> int:
        return self.n_subkeys * self.n_subkeys

    def reads_per_head(self, training: bool) -> int:
        return self.train_topk if training and self.train_topk else self.topk

    @property
    def uses_addr_loss(self) -> bool:
        return bool(self.addr_loss_weight)


@dataclass
class FwMLPConfig(FastWeightConfig):
    """The dense fast-weight SwiGLU MLP baseline (spec section 3)."""

    OPTION: ClassVar[str] = "fwmlp"

    lr: float = 0.1
    hidden: int = 2304

    def __post_init__(self):
        super().__post_init__()
        check_positive("fwmlp.hidden", self.hidden)


@dataclass
class BlockConfig:
    """A fast-weight block inside a decoder layer (spec section 2)."""

    kind: str = "fwpkm"  # fwpkm | fwmlp
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    fwmlp: FwMLPConfig = field(default_factory=FwMLPConfig)
    query_compression: str = "none"  # none | l2norm | zero_mean
    target_norm: str = "zero_mean"  # zero_mean | l2norm | none
    out_fuse_gate: bool = True
    weight_loss_with_gates: bool = True
    residual_value: bool = True
    placement: str = "before_mixer"  # before_mixer | after_mixer
    gate_outputs: int = 8

    def __post_init__(self):
        self.memory = from_mapping(MemoryConfig, self.memory, "model.block.memory")
        self.fwmlp = from_mapping(FwMLPConfig, self.fwmlp, "model.block.fwmlp")
        check_choice("block.kind", self.kind, ("fwpkm", "fwmlp"))
        check_choice("block.query_compression", self.query_compression, ("none", "l2norm", "zero_mean"))
        check_choice("block.target_norm", self.target_norm, ("zero_mean", "l2norm", "none"))
        check_choice("block.placement", self.placement, ("before_mixer", "after_mixer"))
        check_positive("block.gate_outputs", self.gate_outputs)

    @property
    def k_dim(self) -> int:
        return self.memory.heads * self.memory.k_dim if self.kind == "fwpkm" else self.fwmlp.k_dim

    @property
    def v_dim(self) -> int:
        return self.memory.v_dim if self.kind == "fwpkm" else self.fwmlp.v_dim

    @property
    def chunk_size(self) -> int:
        return self.memory.chunk_size if self.kind == "fwpkm" else self.fwmlp.chunk_size


@dataclass
class PKMConfig:
    """Slow-weight product-key memory replacing an FFN (spec section 4)."""

    heads: int = 4
    topk: int = 32
    n_subkeys: int = 512
    k_dim: int = 512
    v_dim: int = 512

    def __post_init__(self):
        for name in ("heads", "topk", "n_subkeys", "k_dim", "v_dim"):
            check_positive(f"pkm.{name}", getattr(self, name))
        if self.k_dim % 2:
            raise ConfigError(f"pkm.k_dim={self.k_dim} must be even")
        if self.topk > self.n_subkeys:
            raise ConfigError(f"pkm.topk={self.topk} must be <= pkm.n_subkeys={self.n_subkeys}")


@dataclass
class AttentionConfig:
    n_heads: int = 12
    n_kv_heads: int = 4
    head_dim: int = 64
    rope_theta: float = 10000.0
    window: int = 512

    def __post_init__(self):
        for name in ("n_heads", "n_kv_heads", "head_dim", "window"):
            check_positive(f"attention.{name}", getattr(self, name))
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"attention.n_heads={self.n_heads} must be a multiple of attention.n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"attention.head_dim={self.head_dim} must be even (RoPE)")


@dataclass
class GDNConfig:
    n_heads: int = 8
    head_dim: int = 64
    conv_size: int = 4

    def __post_init__(self):
        for name in ("n_heads", "head_dim", "conv_size"):
            check_positive(f"gdn.{name}", getattr(self, name))


MIXERS = ("gdn", "fa", "swa")


@dataclass
class ModelConfig:
    """The Qwen3-Next-style hybrid decoder (spec section 5)."""

    vocab_size: int = 32000
    d_model: int = 768
    mixers: list = field(default_factory=lambda: ["gdn"] * 12)  # one entry per layer
    ffn_hidden: int = 2304
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    gdn: GDNConfig = field(default_factory=GDNConfig)
    pkm_layers: list = field(default_factory=list)
    pkm: PKMConfig = field(default_factory=PKMConfig)
    memory_layers: list = field(default_factory=list)
    block: BlockConfig = field(default_factory=BlockConfig)
    fa_to_swa_prob: float = 0.0  # training trick: per step, full attention -> SWA with window = chunk size
    tie_embeddings: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name, cls in (("attention", AttentionConfig), ("gdn", GDNConfig), ("pkm", PKMConfig), ("block", BlockConfig)):
            setattr(self, name, from_mapping(cls, getattr(self, name), f"model.{name}"))
        self.mixers = list(self.mixers)
        self.pkm_layers = list(self.pkm_layers)
        self.memory_layers = list(self.memory_layers)
        for name in ("vocab_size", "d_model", "ffn_hidden"):
            check_positive(f"model.{name}", getattr(self, name))
        if not self.mixers:
            raise ConfigError("model.mixers must name at least one layer")
        for i, m in enumerate(self.mixers):
            check_choice(f"model.mixers[{i}]", m, MIXERS)
        for option in ("pkm_layers", "memory_layers"):
            for i in getattr(self, option):
                if not (isinstance(i, int) and 0 <= i < self.n_layers):
                    raise ConfigError(
                        f"model.{option} contains {i!r}; layer indices must be integers in [0, {self.n_layers - 1}]"
                    )
            if len(set(getattr(self, option))) != len(getattr(self, option)):
                raise ConfigError(f"model.{option}={getattr(self, option)} has duplicate layers")
        if not 0.0 <= self.fa_to_swa_prob <= 1.0:
            raise ConfigError(f"model.fa_to_swa_prob={self.fa_to_swa_prob} must be in [0, 1]")

    @property
    def n_layers(self) -> int:
        return len(self.mixers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return from_mapping(cls, data, "model")
