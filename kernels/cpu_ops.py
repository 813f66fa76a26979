"""C++ CPU kernels for the memory's hot paths; same signatures and results as ``torch_ops``.

The PyTorch path spends most of a small chunk's time in per-call overheads (building a CSR
matrix per row operation, ``torch.topk``'s per-row queue of (value, index) pairs) rather than in
arithmetic. ``cpu_ops.cpp`` does the same work in plain loops:

- ``topk_rows``: the top-k of each row by insertion into a running best-k list (one comparison
  per entry in the common case), used by ``select_subkeys`` and the Cartesian top-k. A row whose
  top k a tie decides (or that holds a NaN) is redone with ``torch.topk``, so the result is always
  ``torch.topk``'s, ties included.
- ``weighted_gather``, ``row_dot``, ``scatter_rows``: the row operations as loops over the reads,
  in the PyTorch path's order of operations (bitwise its results for float32 rows of a multiple of 8
  on the AVX-512 CPUs measured, Intel and AMD: ``sparse_product_fuses`` asks MKL's rounding once;
  elsewhere they may differ by rounding).

The extension is compiled with the C++ compiler on first use (``torch.utils.cpp_extension``,
cached under ``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). Where it cannot be built
(no compiler), ``can_run`` is False, ``why_not`` says why and the "auto" backend keeps PyTorch.
``FWPKM_CPU_KERNELS=0`` turns the kernels off for "auto".
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import torch_ops

SOURCE = Path(__file__).with_name("cpu_ops.cpp")
# no fused multiply-add but the explicit ones (std::fma), which -mfma makes one instruction
_FMA = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
_FLAGS = ["-O3", "-ffp-contract=off"] + (["-mfma"] if _FMA else [])
_lock = threading.Lock()
_module = None
_error: Optional[BaseException] = None


def _extension():
    """The compiled extension (built once per process, cached on disk), or None if it cannot be built."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is None and _error is None:
            try:
                from torch.utils.cpp_extension import load

                start = time.perf_counter()
                _module = load(name="fwpkm_cpu_ops" + ("_fma" if _FMA else ""), sources=[str(SOURCE)],
                               extra_cflags=_FLAGS, verbose=False)
                if time.perf_counter() - start > 5:
                    print(f"fwpkm: compiled the C++ CPU kernels ({time.perf_counter() - start:.0f} s, "
                          "once: they are cached for the next runs)", file=sys.stderr)
            except Exception as exc:  # no compiler, no headers: the PyTorch path stays
                _error = exc
    return _module


def enabled_for_auto() -> bool:
    return os.environ.get("FWPKM_CPU_KERNELS", "1").lower() not in ("0", "false", "off", "no")


def can_run(device: torch.device) -> bool:
    return device.type == "cpu" and _extension() is not None


def why_not(device: torch.device) -> str:
    if device.type != "cpu":
        return f"the C++ kernels run on CPU tensors (got {device.type})"
    _extension()
    return f"the C++ extension could not be built ({_error!r})"


# -- top-k ------------------------------------------------------------------------------------
def topk_rows(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(x, k, dim=-1)`` (largest, sorted) of a float tensor [..., n], no gradient."""
    shape = x.shape
    flat = x.detach().reshape(-1, shape[-1]).contiguous()
    vals, ids, redo = _extension().topk_rows(flat, k)
    if redo.any():  # a tie decides these rows: torch.topk's own choice among equals
        rows = redo.nonzero().squeeze(-1)
        vals[rows], ids[rows] = flat[rows].topk(k, dim=-1)
    return vals.view(*shape[:-1], k), ids.view(*shape[:-1], k)


def select_subkeys(q: Tensor, keys: Tensor, topk: int, score: str) -> Tensor:
    """``torch_ops.select_subkeys`` with its top-k from ``topk_rows`` (the same ids)."""
    return torch_ops.select_subkeys(q, keys, topk, score, topk_fn=lambda rank, k: topk_rows(rank, k)[1])


# -- row operations -----------------------------------------------------------------------------
def _float(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype).contiguous()


def weighted_gather(w: Optional[Tensor], table: Tensor, idx: Tensor) -> Tensor:
    M, P = idx.shape
    if M == 0 or table.shape[0] == 0:
        return torch_ops.weighted_gather(w, table, idx)
    return _extension().weighted_gather(_float(w, table.dtype), table.contiguous(), idx.contiguous(),
                                        sparse_product_fuses())


_fuses: Optional[bool] = None


def sparse_product_fuses() -> bool:
    """Whether the PyTorch path's weighted gather (MKL's CSR product) fuses its multiply-adds on this CPU.

    MKL picks its kernel by CPU: fused on the Intel AVX-512 machine the kernels were first measured on,
    a multiply then an add on an AMD EPYC (AVX-512) seen on 2026-12-06. The C++ loop rounds as it does,
    so that both backends give the same bits; asked once per process on a small probe (where neither
    order matches, fused, and the backends differ by rounding)."""
    global _fuses
    if _fuses is None:
        g = torch.Generator().manual_seed(0)
        idx = torch.stack([torch.randperm(256, generator=g)[:8] for _ in range(64)])
        w, table = torch.randn(64, 8, generator=g), torch.randn(256, 64, generator=g)
        want = torch_ops.weighted_gather(w, table, idx)
        ext = _extension()
        _fuses = not torch.equal(ext.weighted_gather(w, table, idx, False), want) or \
            torch.equal(ext.weighted_gather(w, table, idx, True), want)
    return _fuses


def row_dot(x: Tensor, table: Tensor, idx: Tensor) -> Tensor:
    M, P = idx.shape
    if M == 0 or P == 0 or table.shape[0] == 0:
        return x.new_zeros(M, P)
    idx = idx.contiguous()
    if P > 1 and _extension().has_repeated_ids(idx):  # the PyTorch path's own branch (and rounding) for these
        return torch_ops.row_dot(x, table, idx)
    return _extension().row_dot(x.to(table.dtype).contiguous(), table.contiguous(), idx)


def scatter_rows(w: Optional[Tensor], x: Tensor, idx: Tensor, n_rows: int,
                 row_scale: Optional[Tensor] = None) -> Tensor:
    M, P = idx.shape
    if M * P == 0 or n_rows == 0:
        return x.new_zeros(n_rows, x.shape[1])
    return _extension().scatter_rows(_float(w, x.dtype), x.contiguous(), idx.contiguous(), n_rows,
                                     _float(row_scale, x.dtype))
