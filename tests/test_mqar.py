"""Multi-query associative recall: the task (lit.synthetic.mqar_sequence, the `mqar` source, the
ids:N tokenizer), its evaluation (lit.evaluation.mqar), model costs (fwpkm.costs) and the
capacity report (ablations.capacity)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fwpkm import preset
from fwpkm.config import ConfigError
from lit.evaluation.mqar import MQARConfig, run_mqar, summarise
from lit.evaluation.stats import mean_interval
from lit.synthetic import IGNORE_INDEX, mqar_sequence
from lit.tokenizer import load_tokenizer


def test_mqar_rows_hold_pairs_then_each_key_queried_once_with_its_value():
    vocab, n, length = 64, 6, 48
    row = mqar_sequence(length, n, vocab, seed=3)
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels) == length
    keys, values = ids[0:2 * n:2], ids[1:2 * n:2]
    assert len(set(keys)) == len(set(values)) == n  # drawn without replacement
    assert all(1 <= k < vocab // 2 <= v < vocab for k, v in zip(keys, values))
    answer = dict(zip(keys, values))
    asked = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert sorted(ids[i] for i in asked) == sorted(keys)  # every key once, at a query position
    for i in asked:
        assert i >= 2 * n and (i - 2 * n) % 2 == 0  # after the pairs, at even offsets
        assert labels[i] == answer[ids[i]] and ids[i + 1] == answer[ids[i]] if i + 1 < length else True
    filler = set(range(2 * n, length)) - set(asked) - {i + 1 for i in asked}
    assert all(ids[i] == 0 for i in filler)
    assert mqar_sequence(length, n, vocab, seed=3) == row and mqar_sequence(length, n, vocab, seed=4) != row


def test_mqar_mixture_power_law_and_errors():
    counts = {sum(label != IGNORE_INDEX for label in mqar_sequence(256, [4, 16], 512, seed=s)["labels"])
              for s in range(40)}
    assert counts == {4, 16}  # one number of pairs drawn per row
    near = far = 0
    for s in range(200):  # power_a = 0.01: most queries soon after the pairs
        labels = mqar_sequence(512, 8, 512, power_a=0.01, seed=s)["labels"]
        gaps = [(i - 16) // 2 for i, label in enumerate(labels) if label != IGNORE_INDEX]
        near += sum(g < 24 for g in gaps)
        far += sum(g >= 24 for g in gaps)
    assert near > far > 0
    with pytest.raises(ValueError, match="too short"):
        mqar_sequence(30, 8, 512)
    with pytest.raises(ValueError, match="keys"):
        mqar_sequence(512, 40, 64)


def test_ids_tokenizer_and_the_mqar_source(tmp_path):
    from lit.data import DataConfig, FwPKMDataModule

    tok = load_tokenizer("ids:2100")
    assert tok.vocab_size == 2104 and tok.eos_id == 2100
    with pytest.raises(ValueError, match="no text"):
        tok.encode("hello")
    with pytest.raises(ValueError, match=r"ids:N"):
        load_tokenizer("ids:lots")
    data = FwPKMDataModule(DataConfig(source="mqar", tokenizer="ids:300", mqar_vocab=300, mqar_pairs=[4, 8],
                                      seq_len=64, batch_size=2, synthetic_train_size=16, synthetic_val_size=4))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (2, 64) and int(batch["input_ids"].max()) < 300
    assert set((batch["labels"] != IGNORE_INDEX).sum(1).tolist()) <= {4, 8}
    with pytest.raises(ConfigError, match="data.mqar_vocab=2100 exceeds the vocab_size=264"):
        FwPKMDataModule(DataConfig(source="mqar", seq_len=256))
    with pytest.raises(ConfigError, match="too short for data.mqar_pairs"):
        DataConfig(source="mqar", seq_len=64, mqar_pairs=[32])


class Oracle(torch.nn.Module):
    """Predicts the next input token (``shift=1``: the answer follows its query) or the current one."""

    def __init__(self, vocab: int, shift: int):
        super().__init__()
        self.vocab, self.shift, self.bias = vocab, shift, torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        target = torch.roll(ids, -self.shift, dims=1) if self.shift else ids
        return SimpleNamespace(logits=torch.nn.functional.one_hot(target, self.vocab).float())

    def fast_weight_state(self):
        return {}

    def load_fast_weight_state(self, state):
        pass


def test_evaluation_scores_exactly_the_queries():
    cfg = MQARConfig(pairs=[4, 16], samples=3, vocab=128, min_seq_len=32)
    perfect, rows = summarise(run_mqar(Oracle(128, 1), cfg)), run_mqar(Oracle(128, 0), cfg)
    assert [(s["pairs"], s["seq_len"], s["acc"], s["sequences"], s["queries"]) for s in perfect] == [
        (4, 32, 1.0, 3, 12), (16, 64, 1.0, 3, 48)]
    assert all(r["correct"] == 0 for r in rows)  # the key itself is never its value
    mean, low, high = mean_interval([0.5, 0.7, 0.9])
    assert math.isclose(mean, 0.7) and math.isclose(low, 0.7 - 4.303 * 0.2 / math.sqrt(3)) and high == 1.0
    assert math.isnan(mean_interval([0.4])[1])
    with pytest.raises(ValueError, match="keys"):
        MQARConfig(pairs=[64], vocab=100)


def test_costs_grow_with_context_only_where_state_does():
    from fwpkm.costs import flops_per_token, state_size

    base = preset("tiny-swa_interleave-fwpkm")
    full = preset("tiny-fa")
    gdn = preset("tiny-gdn")
    assert flops_per_token(full, 4096) > flops_per_token(full, 256)
    assert state_size(full, 4096) == 16 * state_size(full, 256)  # a KV cache of every token
    assert state_size(gdn, 4096) == state_size(gdn, 256) > 0  # a fixed matrix state
    mem = base.block.memory
    slots = len(base.memory_layers) * (mem.n_slots * mem.v_dim + mem.heads * mem.n_subkeys * mem.k_dim)
    no_memory = preset("tiny-swa_interleave")
    assert state_size(base, 256) - state_size(no_memory, 256) == slots
    assert flops_per_token(base, 256) > flops_per_token(no_memory, 256)


def test_capacity_table_and_curve(tmp_path):
    from ablations.capacity import capacity_markdown, plot_capacity

    rows = [{"variant": v, "seed": s, "status": "FINISHED", "mqar": {8: acc, 64: acc / 2},
             "flops_per_token": 2.5e5, "state_size": 4096.0}
            for v, accs in (("base", (0.9, 0.8, 1.0)), ("gdn", (0.2, 0.1, 0.3))) for s, acc in enumerate(accs)]
    table = capacity_markdown(rows, ["base", "gdn"], {"h1k8": "base"})
    line = next(line for line in table.splitlines() if line.startswith("| base"))
    assert "0.90 [0.65, 1.00] (0.90 / 0.80 / 1.00)" in line and "0.45" in line and "0.25M" in line
    assert "| h1k8 (= base)" in table
    assert capacity_markdown([dict(r, mqar={}) for r in rows]) == ""
    assert plot_capacity(rows, tmp_path / "c.png").is_file()


def test_mqar_grid_resolves_every_variant(tmp_path):
    from ablations.grid import load_grid, resolve_runs

    grid = load_grid("mqar")
    specs = resolve_runs(grid, tmp_path, seeds=[0])
    assert not [s.error for s in specs if s.error]
    names = {s.variant: s.summary for s in specs}
    assert names["full_attention"]["mixers"] == "ffff" and names["gdn"]["mixers"] == "gggg"
    assert names["no_memory"]["memory"] == "none" and names["fwmlp"]["memory"] == "fwmlp"
    assert names["base"]["slots"] == 4096 and grid.aliases == {"h1k8": "base"}
