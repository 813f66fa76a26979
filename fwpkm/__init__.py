"""Fast-weight Product Key Memory: the model library."""

from .config import (AttentionConfig, BlockConfig, ConfigError, FwMLPConfig, GDNConfig, MemoryConfig,  # noqa: F401
                     ModelConfig, PKMConfig)
from .fastweights import FastWeightOutput, FastWeightStream  # noqa: F401
from .memory import FwPKMMemory  # noqa: F401
