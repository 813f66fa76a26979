"""``fwpkm eval {ppl,niah,gates,inspect}``: the paper's evaluations on any checkpoint.

Each command writes its tables (CSV, JSON) and plots into ``--out`` (default: the run
folder's ``eval/<command>``) and logs them into MLflow: into the checkpoint's own run when
the run folder knows it, else into a new run of the experiment ``fwpkm-eval``. Every sample
starts from the checkpoint's fast weights (restored between samples), or with
``--fresh-memory`` from freshly initialised ones (seed ``--seed``), written to
``eval/<command>-fresh_memory`` and logged as ``fresh_memory/<metric>``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml

from lit.needles import SPEC_NAME
from lit.usage import OneLineParser, UsageError, float_in, int_at_least, option_value, report

positive = int_at_least(1)

EPILOG = """examples:
  fwpkm eval ppl --ckpt runs/tiny-1a2b --data embedded --window 256 --stream-len 16384
  fwpkm eval niah --ckpt runs/tiny-1a2b --context-lens 1024 8192 32768 --iterations 0 1 2 3
  fwpkm eval mqar --ckpt runs/ablations/mqar/base/seed0 --pairs 8 64 512 1024 --samples 32
  fwpkm eval gates --ckpt runs/tiny-1a2b/checkpoints/last.ckpt --data embedded
  fwpkm eval inspect --ckpt runs/tiny-1a2b --text "Some text to write." --slot 1:123
  fwpkm eval inspect --ckpt runs/tiny-1a2b --needle --families all --context-len 256 --samples 10
  fwpkm eval niah --preset tiny --context-lens 512     # a random model: checks the pipeline
"""


# --------------------------------------------------------------------------- loading


def resolve_checkpoint(ckpt: str) -> tuple[Path, Optional[Path]]:
    """(checkpoint file, run folder or None) for a checkpoint path or a run folder."""
    path = Path(ckpt)
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"--ckpt {ckpt}: run folder has no checkpoints/last.ckpt")
        return last, path
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt {ckpt}: no such checkpoint file or run folder")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    return path, run_dir


def load(args) -> tuple:
    """(model, tokenizer, run folder or None, MLflow run id or None)."""
    from fwpkm import HybridLM
    from lit.config import resolve_model
    from lit.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    if args.ckpt:
        from lit.module import load_model
        from lit.tracking import read_run_id

        path, run_dir = resolve_checkpoint(args.ckpt)
        model, _ = load_model(str(path))
        run_id = read_run_id(run_dir) if run_dir else None
    elif args.preset:
        torch.manual_seed(args.seed)
        _, config = resolve_model({"preset": args.preset}, tokenizer.vocab_size)
        model, run_dir, run_id = HybridLM(config), None, None
    else:
        raise UsageError("--ckpt or --preset is required: a checkpoint or run folder, or a preset for a random model")
    if model.config.vocab_size < tokenizer.vocab_size:
        raise UsageError(f"--tokenizer={args.tokenizer}: vocab {tokenizer.vocab_size} exceeds the model's "
                         f"{model.config.vocab_size}; allowed: the training run's tokenizer")
    if getattr(args, "fresh_memory", False):
        model.reset_fast_weights(args.seed)  # the evaluations restore this state between samples
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    return model.to(device).eval(), tokenizer, run_dir, run_id


def corpus_tokens(source: str, tokenizer, max_tokens: int) -> torch.Tensor:
    """Token ids of a data source (any DataModule source), documents joined with EOS."""
    from lit.data import DataConfig, load_documents, parse_source

    config = DataConfig(source=source)
    docs = load_documents(parse_source(source, "--data"), config, "--data")
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_id", None)
    for doc in docs:
        ids += tokenizer.encode(doc) + ([eos] if eos is not None else [])
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens])


# --------------------------------------------------------------------------- outputs


def load_with_outputs(args, command: str) -> tuple:
    """(model, tokenizer, :class:`Outputs` of ``command``) for ``args``."""
    model, tokenizer, run_dir, run_id = load(args)
    return model, tokenizer, Outputs(args, command, run_dir, run_id)


FRESH = "fresh_memory"


class Outputs:
    """Collects files into the output folder and logs them into MLflow at the end."""

    def __init__(self, args, command: str, run_dir: Optional[Path], run_id: Optional[str]):
        base = Path(args.out) if args.out else (run_dir or Path("runs") / "eval") / "eval"
        self.fresh = bool(getattr(args, "fresh_memory", False))
        self.dir = base / (f"{command}-{FRESH}" if self.fresh else command)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.command, self.run_dir, self.run_id, self.enabled = command, run_dir, run_id, not args.no_mlflow
        self.metrics: dict = {}

    def table(self, name: str, rows: list[dict], show: bool = False) -> list[dict]:
        """``<name>.csv`` and ``<name>.json`` in the output folder (returns ``rows``); ``show`` also prints them."""
        if show:
            print_table(rows)
        path = self.dir / f"{name}.csv"
        if rows:
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        (self.dir / f"{name}.json").write_text(json.dumps(rows, indent=1, default=str))
        return rows

    def finish(self, metrics: Optional[dict] = None) -> None:
        self.metrics.update(metrics or {})
        if self.fresh:  # beside, not over, the figures from the checkpoint's memory
            self.metrics = {f"{FRESH}/{k}": v for k, v in self.metrics.items()}
        print(f"\nwritten to {self.dir}")
        if not self.enabled:
            return
        import mlflow

        from lit.tracking import browse_hint, default_tracking_uri

        runs_folder = self.run_dir.parent if self.run_dir else Path("runs")
        # an ablation's run is in its grid's store, which its config.yaml records, not beside the run
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI")
                                or _run_config_section(self.run_dir, "tracking").get("uri")
                                or default_tracking_uri(runs_folder))
        if self.run_id:
            client = mlflow.MlflowClient()
            try:
                run = client.get_run(self.run_id)
            except mlflow.exceptions.MlflowException:
                print(f"not logged into MLflow: run {self.run_id} of {self.run_dir} is not in "
                      f"{mlflow.get_tracking_uri()} (set MLFLOW_TRACKING_URI to its store); the results are in "
                      f"{self.dir}", file=sys.stderr)
                return
            for k, v in self.metrics.items():
                client.log_metric(self.run_id, k, v)
            client.log_artifacts(self.run_id, str(self.dir), f"eval/{self.dir.name}")
            print(f"logged into MLflow run {self.run_id} (its metrics, and the files under eval/{self.dir.name})")
        else:
            mlflow.set_experiment("fwpkm-eval")
            with mlflow.start_run(run_name=f"eval-{self.command}") as run:
                mlflow.log_metrics(self.metrics)
                mlflow.log_artifacts(str(self.dir), f"eval/{self.dir.name}")
                print(f"logged into MLflow run {run.info.run_id} (experiment fwpkm-eval)")
        print(f"look: {browse_hint(mlflow.get_tracking_uri(), run.info.experiment_id, run.info.run_id)}")


def print_table(rows: list[dict], columns: Optional[list] = None) -> None:
    if not rows:
        print("(no rows)")
        return
    columns = columns or list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(fmt(r[c]).ljust(w) for c, w in zip(columns, widths)))


# --------------------------------------------------------------------------- commands


def cmd_ppl(args) -> None:
    from lit.evaluation.ppl import streamed_perplexity, windowed_perplexity

    model, tokenizer, out = load_with_outputs(args, "ppl")
    tokens = corpus_tokens(args.data, tokenizer, args.max_tokens)
    results = [windowed_perplexity(model, tokens, args.window, args.batch_size)]
    if args.stream_len:
        results.append(streamed_perplexity(model, tokens[: args.stream_len + 1], args.segment_len))
    summary = [{"data": args.data, "mode": r.mode, "tokens": r.tokens, "loss": r.loss, "ppl": r.ppl} for r in results]
    out.table("summary", summary, show=True)
    for r in results:
        out.metrics[f"eval/{r.mode}_ppl"] = r.ppl
        out.table(f"loss_by_position_{r.mode}", r.position_table(args.bins))
    _plot_position_loss(results, out.dir / "loss_by_position.png", args.bins)
    out.finish()


def _plot_position_loss(results, path: Path, bins: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in results:
        rows = r.position_table(bins)
        ax.plot([(x["start"] + x["end"]) / 2 for x in rows], [x["loss"] for x in rows], marker=".", label=r.mode)
    ax.set_xlabel("token position")
    ax.set_ylabel("loss (nats)")
    ax.set_xscale("symlog")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_niah(args) -> None:
    from lit.evaluation.niah import (FAMILY_CELL, NIAHConfig, heatmaps, likelihood_margins, niah_metrics, run_niah, summarise,
                                     with_held_out)

    cfg = NIAHConfig(context_lens=args.context_lens, depths=args.depths, iterations=args.iterations,
                     samples_per_cell=args.samples, n_needles=args.needles, chunk_policy=args.chunk_policy,
                     segment_len=args.segment_len, seed=args.seed, families=_niah_families(args))
    model, tokenizer, out = load_with_outputs(args, "niah")
    haystack = corpus_tokens(args.haystack, tokenizer, max(args.context_lens) * 2 + 4096).tolist()
    rows = run_niah(model, tokenizer, haystack, cfg)
    summary = summarise(with_held_out(rows), by=FAMILY_CELL)
    out.table("samples", rows)
    out.table("summary", summary, show=True)
    print("exact: share of questions answered exactly, [exact_low, exact_high] its 95% Wilson interval; "
          "digit_acc: share of the answer's characters right; answer_nll: the true answer's nats per token, "
          "teacher-forced; held-out: the shipped families but the spec's, pooled")
    out.table("likelihood", likelihood_margins(with_held_out(rows)), show=True)
    print("nats per answer token, paired over the same questions, [_low, _high] 95% t intervals: nll_gain: how much "
          "the passes lowered answer_nll against 0 passes; over_random: the true value's margin over a random value of "
          "its format; over_other: over the haystack's other needle's value (0: nothing recalled / not bound to the key)")
    heatmaps(rows, str(out.dir / "heatmap"))
    metrics = {f"niah/exact_{s['context_len']}_n{s['iterations']}": s["exact"] for s in summarise(rows)}
    out.finish({**metrics, **{k: v for k, v in niah_metrics(rows).items() if v == v}})


def _niah_families(args) -> list:
    """--families, plus the family of --needle-text/--question-text/--key-format/--value-format."""
    from lit.needles import resolve_families

    own = {"needle-text": args.needle_text, "question-text": args.question_text, "key-format": args.key_format,
           "value-format": args.value_format}
    families = list(args.families)
    if any(v is not None for v in own.values()):
        missing = [f"--{option}" for option, value in own.items() if value is None]
        if missing:
            raise UsageError(f"a needle family of your own needs all four options; missing: {', '.join(missing)}")
        mine = {"name": args.family_name, "needle": args.needle_text, "question": args.question_text,
                "key": args.key_format, "value": args.value_format}
        families = ([] if families == [SPEC_NAME] else families) + [mine]  # the default gives way to your own
    return resolve_families(families, "--families")


def cmd_mqar(args) -> None:
    from lit.evaluation.mqar import MQARConfig, mqar_metrics, run_mqar, summarise

    model, _, out = load_with_outputs(args, "mqar")
    data = _run_config_section(out.run_dir, "data")
    given = {"vocab": args.vocab, "power_a": args.power_a, "min_seq_len": args.min_seq_len}
    defaults = {"vocab": data.get("mqar_vocab", 2100), "power_a": data.get("mqar_power_a", 0.01),
                "min_seq_len": data.get("seq_len", 256)}
    try:
        cfg = MQARConfig(pairs=args.pairs, samples=args.samples, seq_len=args.seq_len, seed=args.seed + 1234,
                         **{k: defaults[k] if v is None else v for k, v in given.items()})
    except ValueError as err:
        raise UsageError(f"--pairs={args.pairs}: {err}") from None
    if cfg.vocab > model.config.vocab_size:
        raise option_value("--vocab", cfg.vocab, f"at most the model's vocab_size {model.config.vocab_size}")
    rows = run_mqar(model, cfg)
    summary = summarise(rows)
    out.table("sequences", rows)
    out.table("summary", summary, show=True)
    out.finish(mqar_metrics(summary))


def _run_config_section(run_dir: Optional[Path], section: str) -> dict:
    """A section of a run folder's config.yaml (empty without one)."""
    path = run_dir / "config.yaml" if run_dir else None
    return (yaml.safe_load(path.read_text()) or {}).get(section) or {} if path and path.is_file() else {}


def cmd_gates(args) -> None:
    from lit.evaluation.inspect import addressing_stats, collect_gates, gate_summary
    from lit.plots import gate_histograms

    model, tokenizer, out = load_with_outputs(args, "gates")
    tokens = corpus_tokens(args.data, tokenizer, args.max_tokens)
    n = len(tokens) // args.window
    batches = tokens[: n * args.window].view(n, args.window).split(args.batch_size)
    gates = collect_gates(model, batches)
    if not gates:
        raise UsageError("--ckpt: the model has no gated fast-weight layer; allowed: a model with a FwPKM layer")
    summary = out.table("gates", gate_summary(gates), show=True)
    print()
    out.table("addressing", addressing_stats(model, batches), show=True)
    gate_histograms(gates, str(out.dir / "gate_histograms.png"))
    out.finish({f"gates/layer{r['layer']}_mean": r["mean"] for r in summary})


def cmd_inspect(args) -> None:
    from lit.evaluation.inspect import MemoryInspector

    model, tokenizer, out = load_with_outputs(args, "inspect")
    inspector = MemoryInspector(model, tokenizer)
    if args.needle:
        _inspect_needles(args, model, tokenizer, inspector, out)
    else:
        text = args.text if args.text is not None else Path(args.text_file).read_text()
        inspector.read(tokenizer.encode(text), chunk_size=args.chunk_size)
        slots = [check_slot(model, s) for s in args.slot] or _busiest(inspector, 5)
        rows = []
        for layer, slot in slots:
            history = inspector.slot_history(layer, slot)[: args.top]
            print(f"\nlayer {layer} slot {slot}: {len(inspector.writes.get((layer, slot), []))} writes")
            for w in history:
                print(f"  w={w.weight:.3f} pos {w.position:>6}  {w.context!r}")
                rows.append({"layer": layer, "slot": slot, "weight": w.weight, "position": w.position,
                             "context": w.context})
        out.table("slot_history", rows)
    out.finish()


def _inspect_needles(args, model, tokenizer, inspector, out) -> None:
    """--needle: where the answer's read lands, per family and layer, over the NIAH evaluation's own samples
    (the same haystack and seeds as ``fwpkm eval niah`` at this length)."""
    from lit.evaluation.niah import NIAHConfig, make_samples
    from lit.evaluation.stats import mean_interval
    from lit.needles import resolve_families

    cfg = NIAHConfig(context_lens=[args.context_len], depths=args.depths, samples_per_cell=args.samples,
                     n_needles=args.needles, seed=args.seed, families=resolve_families(args.families, "--families"))
    haystack = corpus_tokens(args.haystack, tokenizer, args.context_len * 2 + 4096).tolist()
    rows = []
    for question, (family, length, depth, sample) in enumerate(make_samples(haystack, tokenizer, cfg)):
        for r in inspector.needle(sample):
            rows.append({"family": family, "question": question, "context_len": length, "depth": depth,
                         "layer": r["layer"], "key": sample.keys[sample.target_index], "answer": sample.answer,
                         "written": len(r["written_slots"]), "overlap": len(r["overlap"]),
                         "on_asked": r["on_asked"], "on_other": r["on_other"], "asked_rank": r["asked_rank"],
                         "other_rank": r["other_rank"], "asked_cos": r["asked_cos"], "other_cos": r["other_cos"]})
    out.table("needle_reads", rows)
    summary = []
    for family in dict.fromkeys(r["family"] for r in rows):
        for layer in sorted({r["layer"] for r in rows}):
            cell = [r for r in rows if r["family"] == family and r["layer"] == layer]
            row = {"family": family, "layer": layer, "questions": len(cell)}
            for name, values in (("on_asked", [r["on_asked"] for r in cell]), ("on_other", [r["on_other"] for r in cell]),
                                 ("asked_minus_other", [r["on_asked"] - r["on_other"] for r in cell]),
                                 ("asked_cos", [r["asked_cos"] for r in cell]), ("other_cos", [r["other_cos"] for r in cell])):
                mean, low, high = mean_interval(values, clip=False)
                row |= {name: round(mean, 4), f"{name}_low": round(low, 4), f"{name}_high": round(high, 4)}
            for name in ("asked_rank", "other_rank"):
                row[f"{name}_median"] = statistics.median(r[name] for r in cell)
            row["asked_rank_below_1024"] = round(sum(r["asked_rank"] < 1024 for r in cell) / len(cell), 4)
            summary.append(row)
    out.table("needle_binding", summary, show=True)
    print("on_asked / on_other: share of the answer's read weight on the slots written by the pair that predicts the "
          "asked / the other needles' first value token (one write of the haystack; 95% t intervals); *_rank: the rank of "
          "that pair's best slot among all slots in the answer's read (0 = best; read if < topk); *_cos: the cosine of the "
          "answer's query and the pair's")


def check_slot(model, text: str) -> tuple[int, int]:
    """(layer, slot) of a ``--slot LAYER:SLOT`` that exists in ``model``, else a :class:`UsageError`."""
    sizes = {i: m.config.n_slots for i, m in model.fast_weight_memories().items() if hasattr(m.config, "n_slots")}
    allowed = ", ".join(f"{i}:0..{n - 1}" for i, n in sorted(sizes.items())) or "none (no FwPKM layer)"
    try:
        layer, slot = (int(part) for part in text.split(":"))
    except ValueError:
        raise option_value("--slot", text, f"LAYER:SLOT with {allowed}") from None
    if layer not in sizes or not 0 <= slot < sizes[layer]:
        raise option_value("--slot", text, allowed, "no such FwPKM layer and slot")
    return layer, slot


def _busiest(inspector, n: int) -> list:
    ranked = sorted(inspector.writes.items(), key=lambda kv: -sum(w.weight for w in kv[1]))
    return [key for key, _ in ranked[:n]]


# --------------------------------------------------------------------------- parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description's line breaks kept, and every option's default shown (unless its help says it)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or hidden or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fwpkm eval", description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{ppl,niah,mqar,gates,inspect}")
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, formatter_class=HelpFormatter, **k)
    common = OneLineParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    common.add_argument("--ckpt", help="a checkpoint file or a run folder (uses checkpoints/last.ckpt)")
    common.add_argument("--preset", help="evaluate a randomly initialised model of this preset instead")
    common.add_argument("--tokenizer", default="byte", help="the training run's tokenizer (default: byte)")
    common.add_argument("--out", help="output folder (default: <run folder>/eval/<command>, or <command>-fresh_memory)")
    common.add_argument("--no-mlflow", action="store_true", help="do not log into MLflow")
    common.add_argument("--seed", type=int, default=0, help="seed of the samples (and of --fresh-memory)")
    common.add_argument("--fresh-memory", action="store_true",
                        help="start every sample from freshly initialised fast weights instead of the checkpoint's")
    common.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is available")

    ppl = sub.add_parser("ppl", parents=[common], help="perplexity in windows and streamed, loss by position")
    ppl.add_argument("--data", default="embedded", help="any data source: embedded, hf:NAME[:CONFIG], a local file")
    ppl.add_argument("--window", type=positive, default=256, help="tokens predicted per window")
    ppl.add_argument("--batch-size", type=positive, default=8)
    ppl.add_argument("--max-tokens", type=positive, default=65536, help="tokens of the source to evaluate on")
    ppl.add_argument("--stream-len", type=int_at_least(0), default=16384, help="length of the streamed input (0: skip)")
    ppl.add_argument("--segment-len", type=positive, default=512, help="tokens fed per call when streaming")
    ppl.add_argument("--bins", type=positive, default=32, help="position bins of the loss-by-position table")
    ppl.set_defaults(fn=cmd_ppl)

    niah = sub.add_parser("niah", parents=[common], help="needle in a haystack with iterative memorisation")
    niah.add_argument("--context-lens", type=positive, nargs="+", default=[1024], help="haystack lengths in tokens")
    niah.add_argument("--depths", type=float_in(0.0, 1.0), nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                      help="where the needle asked for sits, as a fraction of the haystack")
    niah.add_argument("--iterations", type=int_at_least(0), nargs="+", default=[0, 1, 2, 3],
                      help="extra passes over the haystack before the question")
    niah.add_argument("--samples", type=positive, default=2, help="samples per (context length, depth)")
    niah.add_argument("--needles", type=positive, default=5,
                      help="needles per haystack, one of them asked for (the paper: 5)")
    niah.add_argument("--chunk-policy", choices=["input", "model"], default="input",
                      help="input: chunk size = input length, one write per pass (the paper); model: trained chunk")
    niah.add_argument("--segment-len", type=positive, default=2048, help="tokens fed per call")
    niah.add_argument("--haystack", default="embedded", help="data source of the haystack text")
    niah.add_argument("--families", nargs="+", default=[SPEC_NAME], metavar="FAMILY",
                      help="needle families: shipped names (spec, vault, agent, locker, ledger), 'all', or .yaml files "
                           "of families (lit/assets/needle_families.yaml shows the format); each reported on its own")
    own = niah.add_argument_group("a needle family of your own (all four; patterns: [a-z0-9] classes, (a|b) choices, {n})")
    own.add_argument("--needle-text", help="needle sentence with {key} and {value}, starting with a space, "
                                           "e.g. ' The code of {key} is {value}.'")
    own.add_argument("--question-text", help="question with {key}; the answer follows it, e.g. 'The code of {key} is '")
    own.add_argument("--key-format", help="pattern of the keys, e.g. 'K-[0-9]{4}'")
    own.add_argument("--value-format", help="pattern of the values, e.g. '[A-Z]{5}'")
    own.add_argument("--family-name", default="custom", help="name of that family in the tables")
    niah.set_defaults(fn=cmd_niah)

    mqar = sub.add_parser("mqar", parents=[common], help="multi-query associative recall by number of pairs (capacity)")
    mqar.add_argument("--pairs", type=positive, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024],
                      help="numbers of key-value pairs, one point of the curve each")
    mqar.add_argument("--samples", type=positive, default=16, help="sequences per number of pairs")
    mqar.add_argument("--vocab", type=positive, default=None, help="key and value ids (default: the run's data.mqar_vocab)")
    mqar.add_argument("--power-a", type=float, default=None, help="query placement (default: the run's)")
    mqar.add_argument("--min-seq-len", type=positive, default=None, help="shortest sequence (default: the run's seq_len)")
    mqar.add_argument("--seq-len", type=positive, default=None, help="one length for every number of pairs "
                                                                "(default: max(min-seq-len, 4 x pairs))")
    mqar.set_defaults(fn=cmd_mqar)

    gates = sub.add_parser("gates", parents=[common], help="gate distributions and addressing statistics")
    gates.add_argument("--data", default="embedded")
    gates.add_argument("--window", type=positive, default=256)
    gates.add_argument("--batch-size", type=positive, default=8)
    gates.add_argument("--max-tokens", type=positive, default=32768)
    gates.set_defaults(fn=cmd_gates)

    insp = sub.add_parser("inspect", parents=[common], help="which (query, target, context) wrote each slot")
    src = insp.add_mutually_exclusive_group()
    src.add_argument("--text", help="text to read and write into memory")
    src.add_argument("--text-file", help="a file of text to read")
    src.add_argument("--needle", action="store_true", help="trace a needle: slots written and read at question")
    insp.add_argument("--slot", nargs="*", default=[], metavar="LAYER:SLOT", help="slots to show (default: busiest)")
    insp.add_argument("--top", type=positive, default=10, help="writes shown per slot")
    insp.add_argument("--chunk-size", type=positive, help="chunk size while reading (default: the model's)")
    needle = insp.add_argument_group("--needle: where the answer's read lands (NIAH's samples, one write of the haystack)")
    needle.add_argument("--context-len", type=positive, default=1024, help="haystack length")
    needle.add_argument("--haystack", default="embedded")
    needle.add_argument("--families", nargs="+", default=[SPEC_NAME], metavar="FAMILY",
                        help="needle families, as for `fwpkm eval niah` (names, 'all', .yaml files)")
    needle.add_argument("--depths", type=float_in(0.0, 1.0), nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    needle.add_argument("--samples", type=positive, default=1, help="samples per depth")
    needle.add_argument("--needles", type=positive, default=2, help="needles per haystack, one of them asked for")
    insp.set_defaults(fn=cmd_inspect)
    return p


def evaluate(argv: list[str]) -> int:
    """Evaluate a checkpoint: perplexity, needle in a haystack, gates, memory inspection."""
    from fwpkm.config import ConfigError
    from lit.module import CheckpointError

    try:
        args = parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or the one-line parser error already printed
        return exit_.code if isinstance(exit_.code, int) else 0
    prog = f"fwpkm eval {args.command}"
    try:
        if args.command == "inspect" and not (args.text or args.text_file or args.needle):
            raise UsageError("--text, --text-file or --needle is required; allowed: one of them")
        args.fn(args)
    except CheckpointError as err:
        return report(prog, err, 1, args.debug)
    except (UsageError, ConfigError, FileNotFoundError, ValueError, OSError) as err:
        return report(prog, err, 2, args.debug)
    return 0

