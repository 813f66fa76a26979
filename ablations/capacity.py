"""The MQAR capacity table and curve of a grid: recall accuracy against the number of key-value
pairs, per variant, from the ``mqar/acc/P<pairs>`` metrics of its runs (``fwpkm report``).

A cell is the mean over the variant's finished seeds with a two-sided 95% Student's t interval
over those seeds, then each seed's own accuracy (each of which is a mean over its evaluation
sequences; ``mqar.csv`` of the run has them one by one).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from lit.evaluation.stats import mean_interval
from lit.plots import save_figure

NAN = float("nan")


def _finished(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("mqar") and r["status"] == "FINISHED"]


def _variants(rows: list[dict], order: Optional[list]) -> list[str]:
    present = {r["variant"] for r in rows}
    return [v for v in (order or []) if v in present] + sorted(present - set(order or []))


def _cell(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    mean, low, high = mean_interval(values)
    interval = f" [{low:.2f}, {high:.2f}]" if math.isfinite(low) else ""
    return f"{mean:.2f}{interval} ({' / '.join(f'{v:.2f}' for v in values)})"


def _quantity(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    value = values[0]
    return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value / 1e3:.1f}K" if value >= 1e3 else f"{value:.0f}"


def capacity_markdown(rows: list[dict], order: Optional[list] = None, aliases: Optional[dict] = None) -> str:
    """The capacity table (empty when no run has MQAR metrics)."""
    rows = _finished(rows)
    if not rows:
        return ""
    pairs = sorted({p for r in rows for p in r["mqar"]})
    header = "| variant | seeds | FLOPs/token | state | " + " | ".join(f"{p} pairs" for p in pairs) + " |"
    lines = ["MQAR recall accuracy by number of key-value pairs: mean [95% t interval over seeds] "
             "(each seed); FLOPs/token and state (numbers carried from token to token) at the training length:",
             "", header, "|---|---|---|---|" + "---|" * len(pairs)]
    for variant in _variants(rows, order):
        group = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"])
        cells = [variant, ",".join(str(r["seed"]) for r in group),
                 _quantity([r.get("flops_per_token") for r in group]), _quantity([r.get("state_size") for r in group])]
        cells += [_cell([r["mqar"].get(p, NAN) for r in group]) for p in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    for alias, target in (aliases or {}).items():
        if any(r["variant"] == target for r in rows):
            lines.append(f"| {alias} (= {target}) | | | | " + " | ".join("" for _ in pairs) + " |")
    return "\n".join(lines)


def plot_capacity(rows: list[dict], path: Path, order: Optional[list] = None, title: str = "",
                  per_panel: int = 8) -> Optional[Path]:
    """Accuracy against the number of pairs (log scale), a line per variant (mean over seeds, bars: the 95%
    t interval), each seed as a dot; more than ``per_panel`` variants go on side-by-side panels, each with
    the reference (``base``, else the first variant) dashed."""
    rows = _finished(rows)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    pairs = sorted({p for r in rows for p in r["mqar"]})
    variants = _variants(rows, order)
    reference = "base" if "base" in variants else variants[0]
    others = [v for v in variants if v != reference]
    panels = [others[i:i + per_panel] for i in range(0, len(others), per_panel)] or [[]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False, sharey=True)
    colours = plt.get_cmap("tab20").colors
    for ax, names in zip(axes[0], panels):
        for variant in [reference, *names]:
            group = [r for r in rows if r["variant"] == variant]
            colour = "black" if variant == reference else colours[(2 * others.index(variant)) % len(colours)]
            stats = [_interval([r["mqar"][p] for r in group if p in r["mqar"]]) for p in pairs]
            means = [m for m, _, _ in stats]
            below = [0.0 if math.isnan(lo) else m - lo for m, lo, _ in stats]
            above = [0.0 if math.isnan(hi) else hi - m for m, _, hi in stats]
            ax.errorbar(pairs, means, yerr=[below, above], color=colour, marker="o", capsize=3,
                        linestyle="--" if variant == reference else "-", label=variant)
            for r in group:
                ax.scatter([p for p in pairs if p in r["mqar"]], [r["mqar"][p] for p in pairs if p in r["mqar"]],
                           color=colour, s=8, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(pairs, [str(p) for p in pairs])
        ax.set_xlabel("key-value pairs in the sequence")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2, loc="center right")
    axes[0][0].set_ylabel("MQAR recall accuracy")
    fig.suptitle(title or "MQAR capacity")
    return save_figure(fig, path)


def _interval(values: list[float]) -> tuple[float, float, float]:
    """mean_interval, or NaNs where a variant was not evaluated at this number of pairs."""
    return mean_interval(values) if values else (NAN, NAN, NAN)
