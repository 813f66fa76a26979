"""Dispatch of the memory's hot paths: Triton on CUDA, PyTorch elsewhere.

``set_backend("torch" | "triton" | "auto")`` forces a path for the whole process;
a memory's ``config.backend`` does the same for one layer.
"""

from __future__ import annotations

from .torch_ops import address, gather_rows, scatter_rows  # noqa: F401
