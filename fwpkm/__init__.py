"""Fast-weight Product Key Memory: the model library."""

from .config import (AttentionConfig, BlockConfig, ConfigError, FwMLPConfig, GDNConfig, MemoryConfig,  # noqa: F401
                     ModelConfig, PKMConfig)
from .fastweights import FastWeightOutput, FastWeightStream  # noqa: F401
from .memory import FwPKMMemory  # noqa: F401
from .block import FastWeightBlock  # noqa: F401
from .fwmlp import FwMLPMemory  # noqa: F401
from .model import HybridLM, LMOutput, ModelCache  # noqa: F401
from .presets import preset, preset_names  # noqa: F401
