"""``fwpkm report GRID|STUDY``: summary tables and plots rebuilt from the MLflow store alone.

Grid: one row per variant (aliases repeat their target), mean ± std over seeds of the final
validation loss (ln of the last ``val/ppl``) and perplexity, the NIAH exact match when the
grid evaluated it, training tokens/s (median over the steps of a run), parameter count and
the mean gate (last ``mem/L*/gate_mean``, averaged over memory layers), the effective reads
per token (last ``mem/L*/effective_reads``: heads x top-k for plain averages, 1 when one slot
takes all the weight), plus the difference
of validation loss to the ``base`` variant and the run status. For each (variant, seed) the
report takes the newest run, preferring finished ones.

Study: one row per trial (number, state, objective, parameters, final val perplexity), the
best trial first-class, and Optuna's optimisation-history, parameter-importance and slice
plots drawn from an in-memory study rebuilt from the trials' MLflow runs.

Grids also get ``summary_niah.png`` (NIAH digit accuracy against context length) and
``summary_gates.png`` (each memory layer's mean output gate against the training step).

Both write ``summary.csv``, ``summary.md`` and ``summary.png`` (+ the Optuna plots) into the
output folder and, unless ``--no-log``, attach them to the grid's or study's parent run.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from pathlib import Path
from typing import Callable, Optional

from ablations import capacity
from lit.evaluation.stats import mean_interval, wilson_interval
from lit.plots import save_figure
from lit.tracking import Store, browse_hint, child_runs, find_parent, resolve_tracking_uri, store_lock

NAN = float("nan")


# --------------------------------------------------------------------------- grid


def _metric_mean(metrics: dict, suffix: str, prefix: str = "mem/") -> float:
    values = [v for k, v in metrics.items() if k.startswith(prefix) and k.endswith(suffix)]
    return sum(values) / len(values) if values else NAN


def _finite_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """The finite (step, value) points of a metric, by step; empty when MLflow cannot give them."""
    try:
        points = client.get_metric_history(run_id, key)
    except Exception:
        return []
    return sorted((p.step, p.value) for p in points if p.value is not None and math.isfinite(p.value))


def _median_history(client, run_id: str, key: str) -> float:
    values = [v for _, v in _finite_history(client, run_id, key)]
    return statistics.median(values) if values else NAN


def gate_histories(client, run_id: str, metrics: dict) -> dict:
    """{memory layer: [(step, mean gate), ...]} from the ``mem/L<layer>/gate_mean`` histories."""
    histories = {}
    for key in metrics:
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "mem" and parts[1][:1] == "L" and parts[2] == "gate_mean":
            histories[int(parts[1][1:])] = _finite_history(client, run_id, key)
    return histories


def run_row(client, run) -> dict:
    """The numbers of one grid run, from its MLflow run."""
    m, tags = run.data.metrics, run.data.tags
    cells = _niah_cells(m)
    ppl = m.get("val/ppl", NAN)
    return {
        "variant": tags.get("fwpkm.variant", tags.get("variant", "?")),
        "seed": int(tags.get("fwpkm.seed", tags.get("seed", 0)) or 0),
        "run_id": run.info.run_id,
        "status": run.info.status,
        "val_loss": math.log(ppl) if ppl and ppl > 0 and math.isfinite(ppl) else NAN,
        "val_ppl": ppl,
        "val_acc": m.get("val/acc", NAN),
        "niah_exact": m.get("niah/exact", NAN),
        "niah_digit_acc": m.get("niah/digit_acc", NAN),
        "tokens_per_s": _median_history(client, run.info.run_id, "train/tokens_per_s"),
        "params": m.get("model/params", NAN),
        "gate_mean": _metric_mean(m, "/gate_mean"),
        "effective_reads": _metric_mean(m, "/effective_reads"),
        "error": _first_line(tags.get("fwpkm.error", "")),
        **{f"niah_{k[len('niah/exact/'):]}": v for k, v in m.items()
           if k.startswith("niah/exact/") and k.count("/") == 2},
        "cells": cells.pop(None, {}),
        "family_cells": cells,  # the rest: one per needle family
        "positions": {int(k[len("ppl/loss/P"):]): v for k, v in m.items() if k.startswith("ppl/loss/P")},
        "mqar": _mqar_points(m),
        "flops_per_token": m.get("model/flops_per_token", NAN),
        "state_size": m.get("model/state_size", NAN),
        "gates": gate_histories(client, run.info.run_id, m),
    }


def _niah_cells(metrics: dict) -> dict:
    """{family: {(measure, context length, passes): value}} from ``niah/<measure>[/F<family>]/L<len>/n<passes>``;
    family None holds the cells over all families."""
    cells: dict = {}
    for key, value in metrics.items():
        parts = key.split("/")
        family = parts.pop(2)[1:] if len(parts) == 5 and parts[2][:1] == "F" else None
        if len(parts) == 4 and parts[0] == "niah" and parts[2][:1] == "L" and parts[3][:1] == "n":
            cells.setdefault(family, {})[(parts[1], int(parts[2][1:]), int(parts[3][1:]))] = value
    return cells


def by_family(rows: list[dict]) -> dict[str, list[dict]]:
    """{family: rows whose ``cells`` are that family's}, pooled held-out families first, the spec's last;
    empty when no run was evaluated on more than one family."""
    names = {f for r in rows for f in r.get("family_cells", {})}
    if len(names) < 2:
        return {}
    ordered = sorted(names, key=lambda f: (f != "held-out", f == "spec", f))
    return {f: [r | {"cells": r["family_cells"][f]} for r in rows if f in r.get("family_cells", {})] for f in ordered}


def position_markdown(rows: list[dict], order: Optional[list] = None) -> str:
    """Streamed loss by token position (eval.ppl): per variant and bucket of positions, the mean over seeds
    with its 95% Student's t interval, then each seed's; empty when no run has it."""
    rows, starts = _position_rows(rows)
    if not rows:
        return ""
    ends = starts[1:] + [None]
    header = "| variant | seeds | " + " | ".join(f"{a}-{b or ''}" for a, b in zip(starts, ends)) + " |"
    lines = ["Streamed loss (nats/token) by token position on held-out text: mean over seeds [95% t interval] "
             "(each seed below):", "", header, "|---|---|" + "---|" * len(starts)]
    for variant in _variant_order(rows, order):
        group = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"])
        cells = []
        for p in starts:
            values = [r["positions"][p] for r in group if p in r["positions"]]
            mean, low, high = mean_interval(values, clip=False) if values else (NAN, NAN, NAN)
            cells.append(f"{mean:.3f}" + (f" [{low:.3f}, {high:.3f}]" if not math.isnan(low) else ""))
        lines.append(f"| {variant} | {len(group)} | " + " | ".join(cells) + " |")
        for r in group:
            lines.append(f"| {variant} | seed {r['seed']} | " +
                         " | ".join(f"{r['positions'][p]:.3f}" if p in r["positions"] else "" for p in starts) + " |")
    return "\n".join(lines)


def _position_rows(rows: list[dict]) -> tuple[list[dict], list[int]]:
    """(finished rows with loss by position, the buckets' first positions)."""
    rows = [r for r in rows if r.get("positions") and r["status"] == "FINISHED"]
    return rows, sorted({p for r in rows for p in r["positions"]})


def plot_positions(rows: list[dict], path: Path, order: Optional[list] = None, title: str = "") -> Optional[Path]:
    """Streamed loss against token position (bucket midpoints), a line per variant with its seeds' 95% interval."""
    rows, starts = _position_rows(rows)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    mids = [(a + b) / 2 for a, b in zip(starts, starts[1:] + [2 * starts[-1]])]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for variant in _variant_order(rows, order):
        stats = [mean_interval([r["positions"][p] for r in rows if r["variant"] == variant and p in r["positions"]], clip=False)
                 for p in starts]
        y = [s[0] for s in stats]
        ax.plot(mids, y, marker="o", label=variant)
        if all(not math.isnan(s[1]) for s in stats):
            ax.fill_between(mids, [s[1] for s in stats], [s[2] for s in stats], alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position (bucket midpoint)")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def _mqar_points(metrics: dict) -> dict:
    """{pairs: accuracy} from ``mqar/acc/P<pairs>``."""
    return {int(k[len("mqar/acc/P"):]): v for k, v in metrics.items() if k.startswith("mqar/acc/P")}


def _first_line(text: str) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:200]
    return ""


def _rank(run) -> tuple:
    done = run.info.status == "FINISHED" and run.data.tags.get("fwpkm.stage") == "done"
    return (done, run.info.status == "FINISHED", run.info.start_time or 0)


def grid_runs(store: Store, parent) -> list[dict]:
    """One row per (variant, seed): the newest run, preferring finished ones."""
    children = child_runs(store, parent)
    chosen: dict = {}
    for run in children:
        tags = run.data.tags
        key = (tags.get("fwpkm.variant"), tags.get("fwpkm.seed"))
        if key[0] is None:
            continue
        if key not in chosen or _rank(run) > _rank(chosen[key]):
            chosen[key] = run
    client = store.client
    return [run_row(client, run) for run in chosen.values()]


def _mean_std(values: list) -> tuple[float, float]:
    values = [v for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return NAN, NAN
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else NAN
    return mean, std


METRICS = ("val_loss", "val_ppl", "val_acc", "niah_exact", "niah_digit_acc", "tokens_per_s", "params", "gate_mean",
           "effective_reads")


def summarise_grid(rows: list[dict], order: Optional[list] = None, aliases: Optional[dict] = None):
    """A pandas DataFrame, one row per variant: ``<metric>_mean``/``<metric>_std`` over seeds."""
    import pandas as pd

    aliases = dict(aliases or {})
    variants = list(order or [])
    for r in rows:
        if r["variant"] not in variants:
            variants.append(r["variant"])
    extra = sorted({k for r in rows for k in r if k.startswith("niah_") and k not in METRICS})
    table = []
    for variant in variants:
        source = aliases.get(variant, variant)
        group = sorted((r for r in rows if r["variant"] == source), key=lambda r: r["seed"])
        if not group:
            continue
        finished = [r for r in group if r["status"] == "FINISHED"]
        entry = {"variant": variant, "same_as": source if source != variant else "",
                 "seeds": ",".join(str(r["seed"]) for r in group), "finished": len(finished), "runs": len(group)}
        for metric in METRICS + tuple(extra):
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = _mean_std([r.get(metric, NAN) for r in finished])
        statuses = sorted({r["status"] for r in group})
        entry["status"] = "/".join(statuses)
        entry["error"] = next((r["error"] for r in group if r["status"] != "FINISHED" and r["error"]), "")
        table.append(entry)
    df = pd.DataFrame(table)
    if not df.empty:
        base = df.loc[df["variant"] == "base", "val_loss_mean"]
        df["d_val_loss"] = df["val_loss_mean"] - (float(base.iloc[0]) if len(base) else NAN)
    return df


def _fmt(mean: float, std: float = NAN, digits: int = 3) -> str:
    if mean is None or not math.isfinite(mean):
        return "-"
    if abs(mean) >= 1e5:
        text = f"{mean / 1e6:.{2}f}M"
        return text + (f" ± {std / 1e6:.2f}M" if std is not None and math.isfinite(std) else "")
    text = f"{mean:.{digits}f}"
    if std is not None and math.isfinite(std):
        text += f" ± {std:.{digits}f}"
    return text


def grid_markdown(df, title: str = "") -> str:
    """The summary as a Markdown table (also what ``fwpkm ablate`` and ``fwpkm report`` print)."""
    if df is None or df.empty:
        return (f"### {title}\n\n" if title else "") + "(no runs)"
    has_niah = "niah_exact_mean" in df and df["niah_exact_mean"].notna().any()
    header = ["variant", "seeds", "val loss", "Δ vs base", "val ppl", "val acc"] + \
        (["NIAH exact", "NIAH digits"] if has_niah else []) + \
        ["tokens/s", "params", "gate", "reads/token", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for _, r in df.iterrows():
        name = r["variant"] + (f" (= {r['same_as']})" if r.get("same_as") else "")
        status = r["status"] if r["status"] != "FINISHED" else "ok"
        if r.get("error"):
            status += f": {r['error'][:80]}".replace("|", "/")
        d = r.get("d_val_loss", NAN)
        cells = [name, f"{r['finished']}/{r['runs']}", _fmt(r["val_loss_mean"], r["val_loss_std"]),
                 "-" if not math.isfinite(d) else f"{d:+.3f}", _fmt(r["val_ppl_mean"], r["val_ppl_std"], 2),
                 _fmt(r["val_acc_mean"], r["val_acc_std"], 3)]
        if has_niah:
            cells += [_fmt(r["niah_exact_mean"], r["niah_exact_std"], 2),
                      _fmt(r.get("niah_digit_acc_mean", NAN), r.get("niah_digit_acc_std", NAN), 2)]
        cells += [_fmt(r["tokens_per_s_mean"], r["tokens_per_s_std"], 0), _fmt(r["params_mean"], NAN, 0),
                  _fmt(r["gate_mean_mean"], r["gate_mean_std"], 3),
                  _fmt(r["effective_reads_mean"], r["effective_reads_std"], 2), status]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    return (f"### {title}\n\n" if title else "") + text


def _variant_order(rows: list[dict], order: Optional[list]) -> list:
    variants = [v for v in (order or []) if any(r["variant"] == v for r in rows)]
    return variants + sorted({r["variant"] for r in rows} - set(variants))


def _niah_axes(rows: list[dict]) -> tuple[list, list, list]:
    """(finished rows with per-cell NIAH metrics, their context lengths, their numbers of passes)."""
    rows = [r for r in rows if r.get("cells") and r["status"] == "FINISHED"]
    return (rows, sorted({L for r in rows for (_, L, _) in r["cells"]}),
            sorted({n for r in rows for (_, _, n) in r["cells"]}))


def niah_exact(group: list[dict], L: int, n: int) -> Optional[tuple[float, float, float, int]]:
    """(exact, low, high, questions) of a cell over the runs of ``group``: their questions pooled, with
    the 95% Wilson interval; None for runs that did not record their number of questions."""
    counts = [r["cells"].get(("questions", L, n)) for r in group]
    if not counts or any(c is None or not c > 0 for c in counts):
        return None
    successes = sum(r["cells"].get(("exact", L, n), NAN) * c for r, c in zip(group, counts))
    if math.isnan(successes):
        return None
    total = int(round(sum(counts)))
    return (*wilson_interval(successes, total), total)


def niah_markdown(rows: list[dict], order: Optional[list] = None) -> str:
    """NIAH per needle family when runs were asked more than one (:func:`by_family`), else over all
    questions (:func:`niah_table`)."""
    families = by_family(rows)
    if not families:
        return niah_table(rows, order)
    return "\n\n".join(f"### NIAH, needle family {family}\n\n" + niah_table(family_rows, order)
                        + (f"\n\n{margins}" if (margins := margin_table(family_rows, order)) else "")
                        for family, family_rows in families.items())


def margin_table(rows: list[dict], order: Optional[list] = None) -> str:
    """The true answer's likelihood margin over a random value of its format and over the other needle's
    value (nats per answer token, lit.evaluation.niah.likelihood_margins) per (variant, passes) and
    context length: one run's mean over its questions with their 95% t interval, or the seeds' mean with
    the seeds' t interval. Empty when no run recorded them."""
    rows, lengths, passes = _niah_axes(rows)
    rows = [r for r in rows if any(k[0] == "over_random" for k in r["cells"])]
    if not rows:
        return ""

    def margin(group, name, L, n):
        values = [r["cells"].get((name, L, n), NAN) for r in group]
        if len(group) == 1:
            low, high = (group[0]["cells"].get((f"{name}_{end}", L, n), NAN) for end in ("low", "high"))
            mean = values[0]
        else:
            mean, low, high = mean_interval(values, clip=False)
        if math.isnan(mean):
            return "-"
        return f"{mean:+.2f}" if math.isnan(low) else f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"

    header = "| variant | passes | " + " | ".join(f"{L} tokens" for L in lengths) + " |"
    lines = ["Likelihood margin of the true answer (nats per token; 0: not recalled) over a random value of its "
             "format / over the other needle's value (0: not bound to its key), [95% t interval]:", "", header,
             "|---|---|" + "---|" * len(lengths)]
    for variant in _variant_order(rows, order):
        group = [r for r in rows if r["variant"] == variant]
        for n in passes:
            lines.append(f"| {variant} | {n} | " + " | ".join(
                f"{margin(group, 'over_random', L, n)} / {margin(group, 'over_other', L, n)}" for L in lengths) + " |")
    return "\n".join(lines)


def niah_table(rows: list[dict], order: Optional[list] = None) -> str:
    """NIAH per (variant, passes) and context length: exact match with its 95% Wilson interval and the
    number of questions (all seeds' questions pooled), then digit accuracy; then every seed's own
    figures. Runs without question counts show mean ± std over seeds. Empty when no run has per-cell
    NIAH metrics."""
    rows, lengths, passes = _niah_axes(rows)
    if not rows:
        return ""
    header = "| variant | passes | " + " | ".join(f"{L} tokens" for L in lengths) + " |"
    rule = "|---|---|" + "---|" * len(lengths)

    def cell(group, L, n):
        digits, digits_std = _mean_std([r["cells"].get(("digit_acc", L, n), NAN) for r in group])
        exact = niah_exact(group, L, n)
        if exact is None:
            mean, std = _mean_std([r["cells"].get(("exact", L, n), NAN) for r in group])
            return " / ".join([_fmt(mean, std if len(group) > 1 else NAN, 2),
                               _fmt(digits, digits_std if len(group) > 1 else NAN, 2)])
        p, low, high, total = exact
        return f"{p:.2f} [{low:.2f}, {high:.2f}] n={total} / {_fmt(digits, NAN, 2)}"

    lines = ["NIAH exact match [95% Wilson interval] n=questions (all seeds' questions pooled) / digit accuracy "
             "(chance: 0 / 0.1):", "", header, rule]
    per_seed = ["NIAH exact match [95% Wilson interval] n=questions / digit accuracy of each seed:", "",
                header.replace("passes", "seed, passes"), rule]
    for variant in _variant_order(rows, order):
        group = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"])
        for n in passes:
            lines.append(f"| {variant} | {n} | " + " | ".join(cell(group, L, n) for L in lengths) + " |")
        for r in group:
            for n in passes:
                per_seed.append(f"| {variant} | {r['seed']}, {n} | " + " | ".join(cell([r], L, n) for L in lengths) + " |")
    return "\n".join(lines + [""] + per_seed)


def plot_niah(rows: list[dict], path: Path, order: Optional[list] = None, title: str = "") -> Optional[Path]:
    """Exact match against context length with 95% Wilson intervals (runs without question counts:
    digit accuracy ± std over seeds), one panel per number of passes, a line per variant."""
    rows, lengths, passes = _niah_axes(rows)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    wilson = all(niah_exact([r], L, n) is not None for r in rows for L in lengths for n in passes
                 if ("exact", L, n) in r["cells"])
    fig, axes = plt.subplots(1, len(passes), figsize=(4.0 * len(passes), 3.4), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], passes):
        for variant in _variant_order(rows, order):
            group = [r for r in rows if r["variant"] == variant]
            if wilson:
                stats = [niah_exact(group, L, n) or (NAN, NAN, NAN, 0) for L in lengths]
                y = [s[0] for s in stats]
                err = [[0.0 if math.isnan(s[0]) else s[0] - s[1] for s in stats],
                       [0.0 if math.isnan(s[0]) else s[2] - s[0] for s in stats]]
            else:
                stats = [_mean_std([r["cells"].get(("digit_acc", L, n), NAN) for r in group]) for L in lengths]
                y, err = [m for m, _ in stats], [0.0 if math.isnan(e) else e for _, e in stats]
            ax.errorbar(lengths, y, yerr=err, marker="o", capsize=3, label=variant)
        if not wilson:
            ax.axhline(0.1, color="gray", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(f"{n} extra pass{'es' if n != 1 else ''}")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("NIAH exact match (95% Wilson)" if wilson else "NIAH digit accuracy (dotted: chance)")
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_gates(rows: list[dict], path: Path, order: Optional[list] = None, title: str = "") -> Optional[Path]:
    """Mean output gate of each memory layer against the training step, a line per run (colour:
    variant, line style: seed). A gate that closes early and stays closed is a memory the model
    stopped reading. None when no run logged gates."""
    rows = [r for r in rows if r.get("gates")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers = sorted({layer for r in rows for layer in r["gates"]})
    seeds = sorted({r["seed"] for r in rows})
    variants = _variant_order(rows, order)
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(layers), figsize=(4.6 * len(layers), 3.4), squeeze=False, sharey=True)
    for ax, layer in zip(axes[0], layers):
        for r in sorted(rows, key=lambda r: (variants.index(r["variant"]), r["seed"])):
            points = r["gates"].get(layer)
            if points:
                ax.plot([s for s, _ in points], [g for _, g in points], color=f"C{variants.index(r['variant']) % 10}",
                        linestyle=styles[seeds.index(r["seed"]) % len(styles)], linewidth=1.2,
                        label=f"{r['variant']} seed {r['seed']}")
        ax.set_title(f"memory layer {layer}")
        ax.set_xlabel("training step")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean output gate")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_grid(df, path: Path, title: str = "") -> Optional[Path]:
    if df is None or df.empty:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [("val_loss", "final validation loss (nats)"), ("tokens_per_s", "training tokens/s")]
    if "niah_exact_mean" in df and df["niah_exact_mean"].notna().any():
        panels.insert(1, ("niah_exact", "NIAH exact match"))
    names = [r["variant"] + (f" (={r['same_as']})" if r["same_as"] else "") for _, r in df.iterrows()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.9 + 0.38 * len(df)), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels):
        means = df[f"{metric}_mean"].astype(float).fillna(0.0).tolist()
        stds = df[f"{metric}_std"].astype(float).fillna(0.0).tolist()
        colors = ["tab:gray" if n.startswith("base") else "tab:blue" for n in names]
        ax.barh(range(len(df)), means, xerr=stds, color=colors, capsize=3)
        ax.set_yticks(range(len(df)), names if ax is axes[0][0] else [""] * len(df))
        ax.invert_yaxis()
        ax.set_xlabel(label)
        if metric == "val_loss" and any(m > 0 for m in means):
            low = min(m for m in means if m > 0)
            high = max(m + s for m, s in zip(means, stds))
            pad = 0.15 * (high - low) + 0.02
            ax.set_xlim(max(0.0, low - pad), high + pad)
        if metric == "niah_exact":
            ax.set_xlim(0.0, 1.0)
        ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _parent_run(store: Store, kind: str, name: str):
    parent = find_parent(store, kind, name)
    if parent is None:
        raise LookupError(f"no MLflow parent run of {kind} {name!r} in experiment {store.experiment!r} at {store.uri}")
    return parent


def grid_report(store: Store, grid: str, out_dir: Optional[Path] = None, log: bool = True,
                echo: Callable[[str], None] = print) -> dict:
    """Rebuild the grid's summary from MLflow: print it, write CSV/Markdown/PNG, attach to the parent run."""
    parent = _parent_run(store, "grid", grid)
    tags = parent.data.tags
    order = json.loads(tags.get("fwpkm.variants", "[]") or "[]")
    aliases = json.loads(tags.get("fwpkm.aliases", "{}") or "{}")
    rows = grid_runs(store, parent)
    df = summarise_grid(rows, order, aliases)
    title = f"ablation grid {grid}"
    md = grid_markdown(df, title)
    niah_md = niah_markdown(rows, order)
    if niah_md:
        md += "\n\n" + niah_md
    positions_md = position_markdown(rows, order)
    if positions_md:
        md += "\n\n" + positions_md
    capacity_md = capacity.capacity_markdown(rows, order, aliases)
    if capacity_md:
        md += "\n\n" + capacity_md
    echo(md)
    files = {}
    if out_dir is not None:
        out = Path(out_dir)
        files.update(write_summary(out, df, md))
        png = plot_grid(df, out / "summary.png", title)
        if png:
            files["png"] = png
        niah_png = plot_niah(rows, out / "summary_niah.png", order, title)
        if niah_png:
            files["niah_png"] = niah_png
        for family, family_rows in by_family(rows).items():
            family_png = plot_niah(family_rows, out / f"summary_niah_{family}.png", order, f"{title}, needles: {family}")
            if family_png:
                files[f"niah_{family}_png"] = family_png
        positions_png = plot_positions(rows, out / "summary_positions.png", order, title)
        if positions_png:
            files["positions_png"] = positions_png
        gates_png = plot_gates(rows, out / "summary_gates.png", order, title)
        if gates_png:
            files["gates_png"] = gates_png
        capacity_png = capacity.plot_capacity(rows, out / "summary_capacity.png", order, title)
        if capacity_png:
            files["capacity_png"] = capacity_png
        if log:
            _attach(store, parent.info.run_id, files.values(), "summary")
            _log_summary_metrics(store, parent.info.run_id, df)
    return {"table": df, "markdown": md, "files": files, "parent_run_id": parent.info.run_id}


def _log_summary_metrics(store: Store, run_id: str, df) -> None:
    """The table's numbers also as metrics of the parent run (``<variant>/val_loss`` ...), for MLflow's charts."""
    from mlflow.entities import Metric
    import time

    now = int(time.time() * 1000)
    metrics = []
    for _, r in df.iterrows():
        for metric in ("val_loss", "val_ppl", "niah_exact", "tokens_per_s"):
            value = r.get(f"{metric}_mean", NAN)
            if value is not None and math.isfinite(value):
                metrics.append(Metric(f"summary/{r['variant']}/{metric}", float(value), now, 0))
    with contextlib.suppress(Exception):
        for start in range(0, len(metrics), 500):
            store.client.log_batch(run_id, metrics=metrics[start:start + 500])


def write_summary(out: Path, df, md: str) -> dict:
    """``summary.csv`` and ``summary.md`` in ``out``; returns {"csv": path, "md": path}."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "summary.csv", "md": out / "summary.md"}
    df.to_csv(files["csv"], index=False)
    files["md"].write_text(md + "\n")
    return files


def _attach(store: Store, run_id: str, paths, artifact_path: str) -> None:
    for path in paths:
        with contextlib.suppress(Exception):
            store.client.log_artifact(run_id, str(path), artifact_path)


# --------------------------------------------------------------------------- study


VAL_LOSS_OBJECTIVE = [{"metric": "val_loss", "direction": "minimize"}]


def study_objectives(tags: dict) -> list[dict]:
    """The study's objectives from its MLflow run's tags (older studies: one, the validation loss)."""
    with contextlib.suppress(ValueError, TypeError):
        found = json.loads(tags.get("optuna.objectives", "") or "null")
        if found:
            return found
    return [{"metric": "val_loss", "direction": tags.get("optuna.direction", "minimize")}]


def study_trials(store: Store, parent, objectives: Optional[list[dict]] = None) -> list[dict]:
    objectives = objectives or VAL_LOSS_OBJECTIVE
    multi = len(objectives) > 1
    children = child_runs(store, parent)
    chosen: dict = {}
    for run in children:
        number = run.data.tags.get("optuna.trial_number")
        if number is None:
            continue
        if number not in chosen or (run.info.start_time or 0) > (chosen[number].info.start_time or 0):
            chosen[number] = run
    client = store.client
    rows = []
    for number, run in chosen.items():
        tags, m = run.data.tags, run.data.metrics
        ppl = m.get("val/ppl", NAN)
        values = [m.get(f"optuna/value/{o['metric']}" if multi else "optuna/value", NAN) for o in objectives]
        row = {"trial": int(number), "state": tags.get("optuna.state", run.info.status), "value": values[0],
               "values": values, "val_ppl": ppl, "run_id": run.info.run_id, "status": run.info.status,
               "params": json.loads(tags.get("optuna.params", "{}") or "{}"),
               "intermediate": {}, "error": _first_line(tags.get("fwpkm.error", ""))}
        with contextlib.suppress(Exception):  # Lightning logs a validation at step (optimizer step - 1)
            for point in client.get_metric_history(run.info.run_id, "val/ppl"):
                if point.value and point.value > 0:
                    row["intermediate"][int(point.step) + 1] = math.log(point.value)
        with contextlib.suppress(Exception):
            row["steps"] = max(int(p.step) for p in client.get_metric_history(run.info.run_id, "train/loss")) + 1
        rows.append(row)
    rows.sort(key=lambda r: r["trial"])
    return rows


def pareto_mask(points: list[list[float]], directions: list[str]) -> list[bool]:
    """Which points no other point dominates (as good in every objective, better in one)."""
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    costs = [[s * v for s, v in zip(signs, point)] for point in points]

    def dominates(a, b) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [not any(dominates(other, c) for other in costs if other is not c) for c in costs]


def recommended_index(points: list[list[float]], directions: list[str]) -> Optional[int]:
    """The point nearest the utopia point, each objective scaled to [0, 1] over the points; ties (every
    two-point front is one) go to the better first objective, then to the first point."""
    if not points:
        return None
    spans = [(min(c), max(c)) for c in zip(*points)]

    def regret(point) -> float:
        total = 0.0
        for v, (low, high), direction in zip(point, spans, directions):
            scaled = 0.0 if high == low else (v - low) / (high - low)
            total += (scaled if direction == "minimize" else 1.0 - scaled) ** 2
        return total

    sign = 1.0 if directions[0] == "minimize" else -1.0
    return min(range(len(points)), key=lambda i: (round(regret(points[i]), 12), sign * points[i][0], i))


def summarise_study(rows: list[dict], objectives: Optional[list[dict]] = None):
    """The trial table; ``best`` marks the best trial, or for several objectives the recommended trial of
    the Pareto front (``pareto``)."""
    import pandas as pd

    objectives = objectives or VAL_LOSS_OBJECTIVE
    names = sorted({k for r in rows for k in r["params"]})
    table = []
    for r in rows:
        entry = {"trial": r["trial"], "state": r["state"]}
        if len(objectives) > 1:
            entry.update({o["metric"]: v for o, v in zip(objectives, r.get("values") or [r["value"]])})
        else:
            entry["value"] = r["value"]
        entry["val_ppl"] = r["val_ppl"]
        entry.update({f"param:{n}": r["params"].get(n, NAN) for n in names})
        entry["steps"] = r.get("steps", NAN)
        entry["error"] = r["error"]
        table.append(entry)
    df = pd.DataFrame(table)
    if df.empty:
        return df
    columns = [o["metric"] for o in objectives] if len(objectives) > 1 else ["value"]
    directions = [o["direction"] for o in objectives]
    complete = df[(df["state"] == "COMPLETE") & df[columns].notna().all(axis=1)]
    df["best"] = False
    if len(objectives) > 1:
        df["pareto"] = False
        if len(complete):
            points = complete[columns].values.tolist()
            front = [i for i, on in zip(complete.index, pareto_mask(points, directions)) if on]
            df.loc[front, "pareto"] = True
            pick = recommended_index(df.loc[front, columns].values.tolist(), directions)
            df.loc[front[pick], "best"] = True
    elif len(complete):
        best = complete["value"].idxmin() if directions[0] == "minimize" else complete["value"].idxmax()
        df.loc[best, "best"] = True
    return df


def study_markdown(df, title: str = "", objectives: Optional[list[dict]] = None) -> str:
    if df is None or df.empty:
        return (f"### {title}\n\n" if title else "") + "(no trials)"
    objectives = objectives or VAL_LOSS_OBJECTIVE
    multi = len(objectives) > 1
    params = [c for c in df.columns if c.startswith("param:")]
    value_columns = [o["metric"] for o in objectives] if multi else ["value"]
    single = "value (val loss)" if objectives[0]["metric"] == "val_loss" else f"value ({objectives[0]['metric']})"
    header = (["trial", "state"] + ([f"{o['metric']} ({o['direction'][:3]})" for o in objectives] if multi
                                    else [single])
              + ["val ppl"] + [p[len("param:"):] for p in params] + ["steps"])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for _, r in df.iterrows():
        marks = ([" (recommended)"] if r.get("best") and multi else [" (best)"] if r.get("best") else [])
        if multi and r.get("pareto") and not r.get("best"):
            marks.append(" (Pareto)")
        cells = [f"{int(r['trial'])}{''.join(marks)}", str(r["state"])]
        cells += [_fmt(r[c], NAN, 4) for c in value_columns]
        cells.append(_fmt(r["val_ppl"], NAN, 2))
        cells += [_fmt_param(r[p]) for p in params]
        cells.append("-" if not math.isfinite(r["steps"]) else str(int(r["steps"])))
        lines.append("| " + " | ".join(cells) + " |")
    return (f"### {title}\n\n" if title else "") + "\n".join(lines)


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _fmt_param(value) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def rebuild_study(rows: list[dict], distributions: dict, objectives: Optional[list[dict]] = None):
    """An in-memory Optuna study holding the trials recorded in MLflow (for Optuna's plots)."""
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import TrialState, create_trial

    objectives = objectives or VAL_LOSS_OBJECTIVE
    dists = {k: json_to_distribution(v) if isinstance(v, str) else v for k, v in distributions.items()}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(directions=[o["direction"] for o in objectives])
    finally:
        optuna.logging.set_verbosity(verbosity)
    for r in rows:
        try:
            state = TrialState[str(r["state"])]
        except KeyError:
            continue
        if state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            continue
        params = {k: v for k, v in r["params"].items() if k in dists and _within(dists[k], v)}
        values = [float(v) for v in (r.get("values") or [r["value"]])]
        finite = all(math.isfinite(v) for v in values)
        if state == TrialState.COMPLETE and not finite:
            continue
        with contextlib.suppress(Exception):
            study.add_trial(create_trial(state=state, values=values if state == TrialState.COMPLETE else None,
                                         params=params, distributions={k: dists[k] for k in params},
                                         intermediate_values=r["intermediate"] if len(objectives) == 1 else None))
    return study


def _within(distribution, value) -> bool:
    """Whether a recorded parameter lies in its distribution (a switched-off point, ``"disabled"``, does not)."""
    try:
        return bool(distribution._contains(distribution.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def study_plots(study, out_dir: Path, objectives: Optional[list[dict]] = None) -> list[Path]:
    """Optuna's plots (matplotlib), whatever can be drawn: optimisation history, parameter importances,
    slice and intermediate values; for several objectives the Pareto front and a slice per objective."""
    import warnings

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    objectives = objectives or VAL_LOSS_OBJECTIVE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(objectives) > 1:
        names = [o["metric"] for o in objectives]
        plots = [("pareto_front", lambda st: ovm.plot_pareto_front(st, target_names=names), 1)]
        for i, name in enumerate(names):
            label = name.replace("/", "_")
            plots.append((f"slice_{label}", lambda st, i=i, name=name: ovm.plot_slice(
                st, target=lambda t: t.values[i], target_name=name), 1))
    else:
        plots = [("optimization_history", ovm.plot_optimization_history, 1),
                 ("param_importances", ovm.plot_param_importances, 2),
                 ("slice", ovm.plot_slice, 1),
                 ("intermediate_values", ovm.plot_intermediate_values, 0)]
    written = []
    for name, fn, needed in plots:
        if len(complete) < needed:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = fn(study)
        except Exception:  # e.g. importances of a study without spread in its values
            plt.close("all")
            continue
        ax = result.flat[0] if hasattr(result, "flat") else result
        fig = ax.figure
        fig.set_size_inches(max(fig.get_size_inches()[0], 6), max(fig.get_size_inches()[1], 4))
        written.append(save_figure(fig, out_dir / f"{name}.png"))
    return written


def study_report(store: Store, study: str, out_dir: Optional[Path] = None, log: bool = True,
                 echo: Callable[[str], None] = print, optuna_study=None) -> dict:
    """The trial table (``summary.md``/``.csv``) and Optuna's plots of a study, from the MLflow store; the
    plots from ``optuna_study`` when given (``fwpkm tune``), else from a study rebuilt from MLflow."""
    parent = _parent_run(store, "study", study)
    tags = parent.data.tags
    objectives = study_objectives(tags)
    rows = study_trials(store, parent, objectives)
    df = summarise_study(rows, objectives)
    title = f"Optuna study {study} ({tags.get('optuna.objective') or 'minimize val loss'})"
    md = study_markdown(df, title, objectives)
    best = df[df["best"]] if not df.empty else df
    if len(best):
        b = best.iloc[0]
        params = {c[len("param:"):]: _plain(b[c]) for c in df.columns if c.startswith("param:")}
        if len(objectives) > 1:
            front = ", ".join(str(int(t)) for t in df[df["pareto"]]["trial"])
            shown = ", ".join(f"{o['metric']} {b[o['metric']]:.4f}" for o in objectives)
            md += (f"\n\nPareto front: trials {front}. Recommended trial {int(b['trial'])} (nearest the utopia point "
                   f"with each objective scaled to [0, 1] over the front; a tie goes to the better "
                   f"{objectives[0]['metric']}): {shown}, params {params}")
        else:
            md += f"\n\nbest trial {int(b['trial'])}: value {b['value']:.4f}, params {params}"
    echo(md)
    files: dict = {}
    if out_dir is not None:
        out = Path(out_dir)
        files.update(write_summary(out, df, md))
        if optuna_study is None:
            distributions = json.loads(tags.get("optuna.distributions", "{}") or "{}")
            optuna_study = rebuild_study(rows, distributions, objectives)
        for i, path in enumerate(study_plots(optuna_study, out, objectives)):
            files[f"plot{i}"] = path
        if log:
            _attach(store, parent.info.run_id, files.values(), "report")
    return {"table": df, "markdown": md, "files": files, "parent_run_id": parent.info.run_id}


# --------------------------------------------------------------------------- entry point


def find_any(runs_dir: Path, name: str, tracking_uri: Optional[str] = None, experiment: Optional[str] = None):
    """(kind, Store) of the grid or study called ``name`` in any experiment of the store."""
    from mlflow.tracking import MlflowClient

    uri, artifacts = resolve_tracking_uri(tracking_uri, Path(runs_dir).resolve())
    probe = Store(uri=uri, experiment=experiment or "", artifact_location=artifacts,
                  runs_dir=Path(runs_dir).resolve())
    client = MlflowClient(tracking_uri=uri)
    with store_lock(uri):  # a fresh SQLite store gets its tables here, one process at a time
        client.search_experiments(max_results=1)
    experiments = [experiment] if experiment else [e.name for e in client.search_experiments()]
    for exp_name in experiments:
        exp = client.get_experiment_by_name(exp_name)
        if exp is None:
            continue
        store = Store(uri=uri, experiment=exp_name, artifact_location=artifacts, experiment_id=exp.experiment_id,
                      runs_dir=probe.runs_dir)
        for kind in ("grid", "study"):
            if find_parent(store, kind, name) is not None:
                return kind, store
    return None, probe


def report(name: str, runs_dir: str = "runs", tracking_uri: Optional[str] = None, out_dir: Optional[str] = None,
           log: bool = True, experiment: Optional[str] = None, echo: Callable[[str], None] = print) -> int:
    from ablations.grid import grid_dir

    kind, store = find_any(Path(runs_dir), name, tracking_uri, experiment)
    if kind is None:
        echo(f"fwpkm report: error: no grid or study named {name!r} in the MLflow store {store.uri}")
        return 2
    if kind == "grid":
        out = Path(out_dir) if out_dir else grid_dir(store.runs_dir, name)
        result = grid_report(store, name, out, log=log, echo=echo)
    else:
        out = Path(out_dir) if out_dir else store.runs_dir / "tune" / name
        result = study_report(store, name, out, log=log, echo=echo)
    echo(f"[report] {kind} {name!r}: " + ", ".join(str(p) for p in result["files"].values()))
    parent = find_parent(store, kind, name)
    if parent is not None:
        search = f"tags.`fwpkm.{kind}` = '{name}'"
        echo(f"[report] compare the runs: {browse_hint(store.uri, parent.info.experiment_id, search=search)}")
    return 0
