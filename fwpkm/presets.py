"""Named model presets: the paper's 12-layer models and CPU-sized ``tiny`` versions.

A preset name is ``SCALE-MIXERS[-pkm][-fwpkm|-fwmlp]``:
  SCALE   paper | tiny
  MIXERS  gdn | fa | swa_interleave | fa_interleave
e.g. ``paper-swa_interleave-pkm-fwpkm`` (the ablation base). ``paper`` and ``tiny``
alone mean that base at that scale.
"""

from __future__ import annotations

from .config import (AttentionConfig, BlockConfig, ConfigError, FwMLPConfig, GDNConfig, MemoryConfig, ModelConfig,
                     PKMConfig)

MIXER_PATTERNS = ("gdn", "fa", "swa_interleave", "fa_interleave")
MEMORY_KINDS = ("fwpkm", "fwmlp")
BASE = "swa_interleave-pkm-fwpkm"


def _paper_scale() -> dict:
    return dict(
        n_layers=12, interleave=(3, 7, 11), pkm_layer=6, fwpkm_with_pkm=[2, 10], memory_layers=[2, 6, 10],
        model=dict(vocab_size=32000, d_model=768, ffn_hidden=2304, attention=AttentionConfig(),
                   gdn=GDNConfig(), pkm=PKMConfig()),
        memory=MemoryConfig(heads=1, topk=8, n_subkeys=512, k_dim=512, v_dim=512, chunk_size=512),
        fwmlp=FwMLPConfig(hidden=2304, k_dim=512, v_dim=512, chunk_size=512),
    )


def _tiny_scale() -> dict:
    return dict(
        n_layers=4, interleave=(1, 3), pkm_layer=2, fwpkm_with_pkm=[1, 3], memory_layers=[1, 2, 3],
        model=dict(vocab_size=264, d_model=128, ffn_hidden=384,
                   attention=AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=32, window=64),
                   gdn=GDNConfig(n_heads=2, head_dim=32),
                   pkm=PKMConfig(heads=2, topk=8, n_subkeys=32, k_dim=64, v_dim=64)),
        memory=MemoryConfig(heads=1, topk=8, n_subkeys=32, k_dim=64, v_dim=64, chunk_size=64),
        fwmlp=FwMLPConfig(hidden=256, k_dim=64, v_dim=64, chunk_size=64),
    )


SCALES = {"paper": _paper_scale, "tiny": _tiny_scale}


def mixer_pattern(pattern: str, n_layers: int, interleave: tuple) -> list:
    if pattern in ("gdn", "fa"):
        return [pattern] * n_layers
    special = "swa" if pattern == "swa_interleave" else "fa"
    return [special if i in interleave else "gdn" for i in range(n_layers)]


def preset(name: str) -> ModelConfig:
    """Build the :class:`ModelConfig` of a preset name (see module docstring)."""
    parts = name.split("-")
    if len(parts) == 1:
        parts += BASE.split("-")
    scale, pattern, *extras = parts
    if scale not in SCALES:
        raise ConfigError(f"preset {name!r}: unknown scale {scale!r}; choose one of {list(SCALES)}")
    if pattern not in MIXER_PATTERNS:
        raise ConfigError(f"preset {name!r}: unknown mixers {pattern!r}; choose one of {list(MIXER_PATTERNS)}")
    unknown = [e for e in extras if e not in ("pkm", *MEMORY_KINDS)]
    memories = [e for e in extras if e in MEMORY_KINDS]
    if unknown or len(memories) > 1:
        raise ConfigError(f"preset {name!r}: suffixes must be '-pkm' and at most one of "
                          f"{['-' + k for k in MEMORY_KINDS]}; got {extras}")
    s = SCALES[scale]()
    with_pkm = "pkm" in extras
    memory_kind = memories[0] if memories else None
    if memory_kind == "fwpkm":
        memory_layers = s["fwpkm_with_pkm"] if with_pkm else s["memory_layers"]
    else:
        memory_layers = s["memory_layers"] if memory_kind else []
    return ModelConfig(
        mixers=mixer_pattern(pattern, s["n_layers"], s["interleave"]),
        pkm_layers=[s["pkm_layer"]] if with_pkm else [],
        memory_layers=memory_layers,
        block=BlockConfig(kind=memory_kind or "fwpkm", memory=s["memory"], fwmlp=s["fwmlp"]),
        **s["model"],
    )


def preset_names() -> list:
    suffixes = ["", "-pkm", "-fwpkm", "-fwmlp", "-pkm-fwpkm", "-pkm-fwmlp"]
    return [f"{s}-{p}{x}" for s in SCALES for p in MIXER_PATTERNS for x in suffixes]
