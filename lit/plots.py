"""Plots of the fast-weight memory shared by training (periodic plots) and evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


def save_figure(fig, path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gate_histograms(gates: dict, path: str, title: Optional[str] = None, dpi: int = 110) -> str:
    """One histogram of gate values per layer (``gates``: layer -> tensor of gates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(gates), figsize=(3.2 * len(gates), 2.6), squeeze=False)
    for ax, (layer, g) in zip(axes[0], sorted(gates.items())):
        g = g.detach().float().cpu().flatten()
        ax.hist(g.numpy(), bins=50, range=(0, 1), color="tab:blue")
        ax.set_title(f"layer {layer}: mean {g.mean():.3f}")
        ax.set_xlabel("gate g")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_memory(memory: dict, memory_configs: dict, out_dir: Path, step: int) -> list[Path]:
    """Write ``gates_step*.png`` and ``slots_step*.png``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    layers = sorted(memory)
    written = []

    gated = [i for i in layers if memory[i].get("gates") is not None]
    if gated:
        path = out_dir / f"gates_step{step:07d}.png"
        gate_histograms({i: memory[i]["gates"] for i in gated}, str(path), f"gate distribution, step {step}", dpi=80)
        written.append(path)

    addressed = [i for i in layers if memory[i].get("indices") is not None and memory_configs.get(i) is not None
                 and hasattr(memory_configs[i], "n_subkeys")]
    if addressed:
        fig, axes = plt.subplots(2, len(addressed), figsize=(4 * len(addressed), 7), squeeze=False)
        for col, layer in enumerate(addressed):
            n = memory_configs[layer].n_subkeys
            idx = memory[layer]["indices"].detach().reshape(-1).cpu()
            counts = torch.bincount(idx, minlength=n * n).numpy().astype(np.float64)
            im = axes[0][col].imshow(np.log1p(counts.reshape(n, n)), cmap="viridis", interpolation="nearest")
            axes[0][col].set_title(f"layer {layer} reads per slot (log1p)")
            axes[0][col].set_xlabel("sub-key j")
            axes[0][col].set_ylabel("sub-key i")
            fig.colorbar(im, ax=axes[0][col], fraction=0.046)
            ranked = np.sort(counts)[::-1]
            axes[1][col].plot(np.arange(1, len(ranked) + 1), ranked / max(ranked.sum(), 1.0))
            axes[1][col].set_xscale("log")
            axes[1][col].set_yscale("log")
            used = (counts > 0).mean()
            axes[1][col].set_title(f"slot usage, ranked (coverage {used:.1%})")
            axes[1][col].set_xlabel("slot rank")
            axes[1][col].set_ylabel("share of reads")
        fig.suptitle(f"slot usage, step {step}")
        fig.tight_layout()
        path = out_dir / f"slots_step{step:07d}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
