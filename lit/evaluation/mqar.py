"""Multi-query associative recall (MQAR) at recall loads beyond training: the capacity curve.

For every number of key-value pairs, ``samples`` fresh sequences (``lit.synthetic.mqar_sequence``,
seeded apart from training's rows) are streamed through the model one at a time, each from the
checkpoint's fast-weight state; a query is recalled when the arg-max next token at the query
is its value. A sequence of P pairs is ``max(min_seq_len, 4 P)`` tokens (the shortest that holds
the pairs and their queries), unless ``seq_len`` fixes it. A sequence goes through the model in one
call (the fast-weight memory writes it chunk by chunk, as in training).

The unit of sampling is the sequence (its queries share one context), so the 95% interval of a
number of pairs is Student's t over the per-sequence accuracies, not a binomial interval over
queries, which would count correlated queries as independent.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from fwpkm import HybridLM
from lit.synthetic import IGNORE_INDEX, hash_seed, mqar_sequence

from .common import device_of, preserved_fast_weights, run_device
from .stats import mean_interval

@dataclass
class MQARConfig:
    """What ``fwpkm eval mqar`` (and a grid's ``eval.mqar``) measures.

    Args:
        pairs: numbers of key-value pairs, each a point of the capacity curve.
        samples: sequences per number of pairs.
        vocab: token ids of keys and values (the training ``data.mqar_vocab``).
        power_a: query placement (the training ``data.mqar_power_a``).
        min_seq_len: the shortest sequence (the training ``data.seq_len``).
        seq_len: a fixed sequence length for every number of pairs (null: max(min_seq_len, 4 x pairs)).
        seed: seeds the evaluation sequences (a stream apart from training's).
    """

    pairs: list = field(default_factory=lambda: [8, 16, 32, 64, 128, 256, 512, 1024])
    samples: int = 32
    vocab: int = 2100
    power_a: float = 0.01
    min_seq_len: int = 256
    seq_len: Optional[int] = None
    seed: int = 1234

    def __post_init__(self):
        self.pairs = [int(p) for p in self.pairs]
        if not self.pairs or min(self.pairs) < 1:
            raise ValueError(f"mqar pairs={self.pairs} must be positive numbers of pairs")
        if self.samples < 1:
            raise ValueError(f"mqar samples={self.samples} must be >= 1")
        if max(self.pairs) >= self.vocab // 2:
            raise ValueError(f"mqar pairs={self.pairs} need more keys than vocab={self.vocab} has ({self.vocab // 2 - 1})")

    def length(self, pairs: int) -> int:
        return self.seq_len or max(self.min_seq_len, 4 * pairs)


def run_mqar(model: HybridLM, cfg: MQARConfig) -> list[dict]:
    """One row per (pairs, sample): its queries, how many were recalled, and the accuracy."""
    model.eval()
    device = device_of(model)
    rows = []
    for pairs in cfg.pairs:
        length = cfg.length(pairs)
        for sample in range(cfg.samples):
            row = mqar_sequence(length, pairs, cfg.vocab, cfg.power_a, hash_seed(cfg.seed, f"eval-mqar-{pairs}", sample))
            ids = torch.tensor([row["input_ids"]], device=device)
            labels = torch.tensor(row["labels"], device=device)
            with preserved_fast_weights(model), torch.inference_mode(False), torch.no_grad():
                predicted = model(ids).logits[0].argmax(-1)  # one call: the memory writes chunk by chunk
            asked = labels != IGNORE_INDEX
            correct = int((predicted[asked] == labels[asked]).sum())
            rows.append({"pairs": pairs, "seq_len": length, "sample": sample, "queries": int(asked.sum()),
                         "correct": correct, "acc": correct / int(asked.sum())})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per number of pairs: mean accuracy over sequences, its 95% interval, sequences and queries."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["pairs"]].append(r)
    out = []
    for pairs, group in sorted(groups.items()):
        mean, low, high = mean_interval([r["acc"] for r in group])
        out.append({"pairs": pairs, "seq_len": group[0]["seq_len"], "acc": mean, "low": low, "high": high,
                    "sequences": len(group), "queries": sum(r["queries"] for r in group)})
    return out


def mqar_metrics(summary: list[dict]) -> dict:
    """``mqar/acc/P<pairs>`` (and its interval as ``.../low`` and ``.../high``) for MLflow."""
    metrics = {}
    for s in summary:
        for name in ("acc", "low", "high"):
            if not math.isnan(s[name]):
                metrics[f"mqar/{name}/P{s['pairs']}"] = float(s[name])
    return metrics


def evaluate_run(run_dir: Path, options: dict, config: dict, gpu: Optional[str] = None) -> tuple[dict, Path]:
    """MQAR capacity of a run's final checkpoint: (metrics, ``mqar.csv``). The vocabulary, query placement
    and shortest length default to the run's own data options (``config``: its run config)."""
    import csv

    from lit.module import load_model

    data, device = config.get("data") or {}, run_device(config, gpu)
    cfg = MQARConfig(**{"vocab": data.get("mqar_vocab", 2100), "power_a": data.get("mqar_power_a", 0.01),
                        "min_seq_len": data.get("seq_len", 256), **options})
    model, _ = load_model(str(Path(run_dir) / "checkpoints" / "last.ckpt"), map_location=device)
    rows = run_mqar(model.to(device), cfg)
    path = Path(run_dir) / "mqar.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return mqar_metrics(summarise(rows)), path
