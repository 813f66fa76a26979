"""Needle in a haystack with iterative memorisation (spec section 7).

For each sample and each n in ``iterations``: start from the model's fast-weight
state, read the haystack n extra times (each pass one write, with chunk size =
input length under the paper's chunk policy), then read haystack + question and
greedily decode the answer. Everything is streamed, so long contexts fit in memory.
Beside the decoded answer, the true value's likelihood is compared with a random value's of
its format and the other needle's (:func:`likelihood_margins`): recall that greedy decoding
does not show, such as a value the model favours but does not put first.
Needles come from one or more families (``families``: the spec's and the held-out ones
of :mod:`lit.needles`), each reported on its own and, pooled, as ``held-out``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from fwpkm import HybridLM
from lit.needles import SPEC_NAME, held_out_family_names, parse_pattern, resolve_families
from lit.synthetic import NIAHSample, hash_seed, make_niah_sample, score_answer

from .common import device_of, preserved_fast_weights, run_device, stream
from .stats import mean_interval, wilson_interval

CHUNK_POLICIES = ("input", "model")
CELL_MEASURES = ("exact", "exact_low", "exact_high", "digit_acc", "answer_nll", "questions")
FAMILY_CELL = ("family", "context_len", "iterations")
LIKELIHOOD_MARGINS = ("nll_gain", "over_random", "over_other")  # likelihood_margins' measures
HELD_OUT = "held-out"  # the pseudo-family pooling the shipped families other than the spec's


@dataclass
class NIAHConfig:
    context_lens: list = field(default_factory=lambda: [1024])
    depths: list = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # of the needle asked for
    iterations: list = field(default_factory=lambda: [0, 1, 2, 3])
    samples_per_cell: int = 2
    n_needles: int = 5
    chunk_policy: str = "input"  # input: one write per pass (the paper) | model: the model's chunk size
    segment_len: int = 2048
    seed: int = 0
    families: list = field(default_factory=lambda: [SPEC_NAME])  # names, 'all', .yaml files or mappings

    def __post_init__(self):
        self.families = resolve_families(self.families, "niah.families")
        if self.chunk_policy not in CHUNK_POLICIES:
            raise ValueError(f"niah.chunk_policy={self.chunk_policy!r}; choose one of {list(CHUNK_POLICIES)}")
        if any(n < 0 for n in self.iterations):
            raise ValueError(f"niah.iterations={self.iterations} must be >= 0")
        if any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"niah.depths={self.depths} must lie in [0, 1]")
        if self.n_needles < 1:
            raise ValueError(f"niah.n_needles={self.n_needles} must be >= 1 (one of them is asked for)")


def make_samples(haystack_ids: Sequence[int], tokenizer, cfg: NIAHConfig) -> list[tuple[str, int, float, NIAHSample]]:
    """(family, context_len, depth, sample) for every cell: the asked needle at ``depth``, the others random."""
    samples = []
    for family in cfg.families:
        stream = "niah" if family.name == SPEC_NAME else f"niah/{family.name}"  # the spec's: as before families
        for length in cfg.context_lens:
            for depth in cfg.depths:
                for i in range(cfg.samples_per_cell):
                    seed = hash_seed(cfg.seed, f"{stream}/{length}/{depth}", i)
                    rng = random.Random(seed)
                    depths = [depth] + [rng.random() for _ in range(cfg.n_needles - 1)]
                    sample = make_niah_sample(haystack_ids, tokenizer, cfg.n_needles, depths, seed=seed, context_len=length,
                                              target_index=0, haystack_start=None, family=family)
                    samples.append((family.name, length, depth, sample))
    return samples


@torch.no_grad()
def answer_sample(model: HybridLM, tokenizer, sample: NIAHSample, n_passes: int, cfg: NIAHConfig,
                  decoys: Sequence[Sequence[int]] = ()) -> tuple[str, list[float]]:
    """Run the iteration protocol on one sample; return the decoded answer text and the mean negative
    log-likelihood (nats per token, teacher-forced from the state the answer is decoded in) of the true
    answer, then of each of ``decoys`` (other answers' token ids)."""
    device = device_of(model)
    context = torch.tensor([sample.context_ids], device=device)
    prompt = torch.tensor([sample.input_ids], device=device)
    n_new = len(sample.answer_ids)
    for _ in range(n_passes):
        cache, _ = stream(model, context, cfg.segment_len, keep_logits=False, chunk_size=_chunk(cfg, context))
        model.flush(cache)  # the pass's single write (or its last one under the model policy)
    # The final read: no write may happen before the answer is decoded under the input policy.
    final_chunk = None if cfg.chunk_policy == "model" else prompt.shape[1] + max([n_new, *map(len, decoys)])
    cache, run = stream(model, prompt, cfg.segment_len, chunk_size=final_chunk)
    first = run.logits[-1][:, -1]
    nlls = []
    for answer in [sample.answer_ids, *decoys]:
        # Under the model policy a chunk may complete (and write) while an answer is fed: keep the state.
        with preserved_fast_weights(model) if cfg.chunk_policy == "model" else contextlib.nullcontext():
            nlls.append(answer_nll(model, copy.deepcopy(cache), first, answer))
    token = first.argmax(-1, keepdim=True)
    generated = [int(token)]
    for _ in range(n_new - 1):
        token = model(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        generated.append(int(token))
    return tokenizer.decode(generated), nlls


def answer_nll(model: HybridLM, cache, first_logits: torch.Tensor, answer_ids: Sequence[int]) -> float:
    """Mean -log p of ``answer_ids`` fed after the prompt (whose last logits are ``first_logits`` [1, V]):
    how much the model believes the right value, whatever it decodes. Advances ``cache``."""
    logits = [first_logits.float()]
    if len(answer_ids) > 1:
        fed = torch.tensor([list(answer_ids[:-1])], device=first_logits.device)
        logits.append(model(fed, cache=cache).logits[0].float())
    log_probs = torch.log_softmax(torch.cat(logits), -1)
    target = torch.as_tensor(list(answer_ids), device=log_probs.device)
    return float(-log_probs[torch.arange(len(target), device=log_probs.device), target].mean())


def _chunk(cfg: NIAHConfig, ids: torch.Tensor) -> Optional[int]:
    return ids.shape[1] if cfg.chunk_policy == "input" else None


def run_niah(model: HybridLM, tokenizer, haystack_ids: Sequence[int], cfg: NIAHConfig,
             progress: bool = True) -> list[dict]:
    """Every (context length, depth, sample, n) -> a row with the exact match, the digit accuracy and the
    negative log-likelihoods of the true answer, a random value of its format and the other needle's value."""
    model.eval()
    samples = make_samples(haystack_ids, tokenizer, cfg)
    families = {f.name: f for f in cfg.families}
    rows = []
    jobs = [(q, s, n) for q, s in enumerate(samples) for n in cfg.iterations]
    for question, (family, length, depth, sample), n in _progress(jobs, progress, "needle in a haystack"):
        random_value = decoy_value(families[family], sample, hash_seed(cfg.seed, "niah/decoy", question))
        decoys = [tokenizer.encode(random_value)] + [tokenizer.encode(v) for v in sample.values[1:2]]
        with preserved_fast_weights(model):
            predicted, nlls = answer_sample(model, tokenizer, sample, n, cfg, decoys)
        exact, digits = score_answer(predicted, sample.answer)
        others = [v for i, v in enumerate(sample.values) if i != sample.target_index]
        other_exact = float(any(score_answer(predicted, v)[0] for v in others)) if others else math.nan
        rows.append({"family": family, "question": question, "context_len": length, "depth": depth, "iterations": n,
                     "answer": sample.answer, "predicted": predicted, "exact": float(exact), "digit_acc": digits,
                     "other_exact": other_exact,
                     "answer_nll": nlls[0], "random_value_nll": nlls[1],
                     "other_needle_nll": nlls[2] if len(nlls) > 2 else math.nan})
    return rows


def decoy_value(family, sample: NIAHSample, seed: int) -> str:
    """A value of the family's format that no needle of ``sample`` holds: what the true answer's
    likelihood is compared with (a memory that recalls the needle prefers the true one)."""
    rng, pattern = random.Random(seed), parse_pattern(family.value)
    for _ in range(100):
        value = pattern.draw(rng)
        if value not in sample.values:
            return value
    raise ValueError(f"needle family {family.name!r}: value {family.value!r} makes too few values for a decoy")


def with_held_out(rows: list[dict]) -> list[dict]:
    """``rows`` plus, when more than one of the shipped held-out families was asked, a copy of their rows
    as family ``held-out``: the zero-shot figure, pooled. Families of your own are never pooled in
    (nothing here knows whether training saw them)."""
    shipped = set(held_out_family_names())
    held_out = [r for r in rows if r.get("family") in shipped]
    if len({r["family"] for r in held_out}) < 2:
        return rows
    return rows + [r | {"family": HELD_OUT} for r in held_out]


def summarise(rows: list[dict], by: tuple = ("context_len", "iterations")) -> list[dict]:
    """Per group: exact match with its 95% Wilson interval over the group's questions, digit accuracy,
    the share of answers that are exactly another needle's value (``other_exact``: a memory
    that recalls values without their keys gives ``exact`` close to it), the true answer's mean negative
    log-likelihood (nats per token) and the number of questions."""
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in by)].append(r)
    out = []
    for key, g in sorted(groups.items()):
        exact, low, high = wilson_interval(sum(r["exact"] for r in g), len(g))
        out.append(dict(zip(by, key)) | {"exact": exact, "exact_low": low, "exact_high": high,
                                         "digit_acc": sum(r["digit_acc"] for r in g) / len(g),
                                         "other_exact": _mean_known(r.get("other_exact", math.nan) for r in g),
                                         "answer_nll": statistics.fmean(r.get("answer_nll", math.nan) for r in g), "questions": len(g)})
    return out


def _mean_known(values) -> float:
    """Mean of the values that are not NaN; NaN when none is."""
    known = [v for v in values if not math.isnan(v)]
    return statistics.fmean(known) if known else math.nan


def likelihood_margins(rows: list[dict], by: tuple = FAMILY_CELL) -> list[dict]:
    """What the memory holds of the answer, decoded or not (nats per answer token, each a paired mean over
    the group's questions with its 95% t interval):

    * ``nll_gain``: how much the passes lowered the true answer's negative log-likelihood against 0
      passes on the same questions (groups with passes > 0);
    * ``over_random``: how much more likely the true value is than a random value of the same format
      (0: nothing of the needle is recalled, only its format);
    * ``over_other``: the same against the value of the haystack's other needle (0: values are
      recalled but not bound to their keys).
    """
    rows = [r for r in rows if "answer_nll" in r and "question" in r]  # rows of a table written before these
    at_zero = {(r.get("family"), r["question"]): r["answer_nll"] for r in rows if r["iterations"] == 0}
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cell, question = groups[tuple(r[k] for k in by)], (r.get("family"), r["question"])
        if r["iterations"] > 0 and question in at_zero:
            cell["nll_gain"].append(at_zero[question] - r["answer_nll"])
        for name, decoy in (("over_random", "random_value_nll"), ("over_other", "other_needle_nll")):
            if not math.isnan(r.get(decoy, math.nan)):
                cell[name].append(r[decoy] - r["answer_nll"])
    out = []
    for key, cell in sorted(groups.items()):
        row = dict(zip(by, key))
        for name in LIKELIHOOD_MARGINS:
            mean, low, high = mean_interval(cell[name], clip=False) if cell[name] else (math.nan,) * 3
            row |= {name: mean, f"{name}_low": low, f"{name}_high": high}
        out.append(row | {"questions": max(len(v) for v in cell.values())})
    return out


def heatmaps(rows: list[dict], path_prefix: str) -> list[str]:
    """One heat map (context length x depth, exact match) per family and number of passes; returns the files."""
    families = list(dict.fromkeys(r.get("family", SPEC_NAME) for r in rows))
    if len(families) > 1:
        return [path for family in families
                for path in heatmaps([r for r in rows if r.get("family", SPEC_NAME) == family], f"{path_prefix}_{family}")]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    lengths = sorted({r["context_len"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    for n in sorted({r["iterations"] for r in rows}):
        cells = summarise([r for r in rows if r["iterations"] == n], by=("context_len", "depth"))
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for c in cells:
            grid[depths.index(c["depth"]), lengths.index(c["context_len"])] = c["exact"]
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.2 + 0.5 * len(depths)))
        im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lengths)), [_k(x) for x in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
        family = rows[0].get("family", SPEC_NAME)
        ax.set_title(f"NIAH exact match ({family}), {n} extra pass{'es' if n != 1 else ''}", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = f"{path_prefix}_n{n}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc)


# --------------------------------------------------------------------------- a finished run


def niah_metrics(rows: list[dict]) -> dict:
    """``niah/<exact|digit_acc>`` over all samples, per number of passes (``.../n<passes>``) and per
    (context length, passes) (``.../L<len>/n<passes>``); with the number of questions (``niah/questions/...``)
    and exact match's Wilson interval (``niah/exact_low/...``, ``niah/exact_high/...``). The same per
    family as ``niah/<measure>/F<family>/...``, with ``Fheld-out`` pooling the held-out families, and there
    the answer's likelihood margins (:func:`likelihood_margins`, ``niah/<nll_gain|over_random|over_other>/F<family>/...``)."""
    metrics = {"niah/exact": sum(r["exact"] for r in rows) / max(1, len(rows)),
               "niah/digit_acc": sum(r["digit_acc"] for r in rows) / max(1, len(rows)), "niah/questions": len(rows)}
    for cell in summarise(rows):
        for name in CELL_MEASURES:
            metrics[f"niah/{name}/L{cell['context_len']}/n{cell['iterations']}"] = cell[name]
    for cell in summarise(rows, by=("iterations",)):
        for name in CELL_MEASURES:
            metrics[f"niah/{name}/n{cell['iterations']}"] = cell[name]
    for cell in summarise(with_held_out(rows), by=FAMILY_CELL):
        for name in CELL_MEASURES:
            metrics[f"niah/{name}/F{cell['family']}/L{cell['context_len']}/n{cell['iterations']}"] = cell[name]
    for cell in likelihood_margins(with_held_out(rows)):
        for name in LIKELIHOOD_MARGINS:
            for measure in (name, f"{name}_low", f"{name}_high"):
                metrics[f"niah/{measure}/F{cell['family']}/L{cell['context_len']}/n{cell['iterations']}"] = cell[measure]
    return metrics


def evaluate_run(run_dir: Path, niah: dict, config: dict, gpu: Optional[str] = None) -> tuple[dict, Path]:
    """NIAH accuracy of the run's final checkpoint (:func:`niah_metrics`); the rows as ``niah.csv``."""
    import csv

    from lit.data import embedded_text
    from lit.module import load_model
    from lit.tokenizer import load_tokenizer

    niah = dict(niah)
    haystack = niah.pop("haystack", "embedded")
    cfg = NIAHConfig(**niah)
    device = run_device(config, gpu)
    model, _ = load_model(str(Path(run_dir) / "checkpoints" / "last.ckpt"), map_location=device)
    model.to(device)
    tokenizer = load_tokenizer(str((config.get("data") or {}).get("tokenizer", "byte")))
    if haystack != "embedded":
        raise ValueError(f"eval.niah.haystack={haystack!r}: only 'embedded' is supported by the grid runner")
    haystack_ids = tokenizer.encode(embedded_text())
    rows = run_niah(model, tokenizer, haystack_ids, cfg, progress=False)
    metrics = niah_metrics(rows)
    path = Path(run_dir) / "niah.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["exact"])
        writer.writeheader()
        writer.writerows(rows)
    return {k: float(v) for k, v in metrics.items() if not math.isnan(float(v))}, path
