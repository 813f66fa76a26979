"""Gate analysis, addressing statistics and memory inspection (spec section 7).

Inspection follows the write rule of spec 1.2: in a chunk, the pair (t, t+L) moves
every slot that token t read, with the read's weight; so the slots a pair wrote are
exactly ``indices[t]``. :class:`MemoryInspector` records those writes per slot.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from fwpkm import HybridLM
from kernels.torch_ops import sub_scores
from lit.synthetic import NIAHSample

from .common import device_of, preserved_fast_weights, stream


# --------------------------------------------------------------------------- gates and addressing


@torch.no_grad()
def collect_gates(model: HybridLM, batches: Iterable[torch.Tensor]) -> dict:
    """Layer -> every gate value the layer produced on ``batches`` (1-D tensor)."""
    model.eval()
    gates = defaultdict(list)
    with preserved_fast_weights(model):
        for ids in batches:
            for layer, mo in model(ids.to(device_of(model))).memory.items():
                if mo.gates is not None:
                    gates[layer].append(mo.gates.flatten().float().cpu())
    return {layer: torch.cat(g) for layer, g in gates.items()}


def gate_summary(gates: dict) -> list[dict]:
    rows = []
    for layer, g in sorted(gates.items()):
        q = torch.quantile(g, torch.tensor([0.1, 0.5, 0.9]))
        rows.append({"layer": layer, "mean": float(g.mean()), "std": float(g.std()), "p10": float(q[0]),
                     "median": float(q[1]), "p90": float(q[2]), "frac_above_half": float((g > 0.5).float().mean()),
                     "tokens": g.numel()})
    return rows


@torch.no_grad()
def addressing_stats(model: HybridLM, batches: Iterable[torch.Tensor]) -> list[dict]:
    """Per memory layer: addressing statistics averaged over every call on ``batches``."""
    model.eval()
    sums = defaultdict(lambda: defaultdict(float))
    counts = defaultdict(int)
    with preserved_fast_weights(model):
        for ids in batches:
            for layer, mo in model(ids.to(device_of(model))).memory.items():
                counts[layer] += 1
                for k, v in mo.stats.items():
                    sums[layer][k] += float(v)
    return [{"layer": layer} | {k: v / counts[layer] for k, v in s.items()} for layer, s in sorted(sums.items())]


# --------------------------------------------------------------------------- inspection


@dataclass
class SlotWrite:
    layer: int
    slot: int
    head: int
    position: int  # the query token's position
    query_token: int
    target_token: int  # the token at position + lookahead
    weight: float
    context: str  # text around the pair


class MemoryInspector:
    """Reads text into the model and records, for every FwPKM layer, which pairs wrote which slots."""

    def __init__(self, model: HybridLM, tokenizer, context_chars: int = 24):
        self.model, self.tokenizer, self.context_chars = model, tokenizer, context_chars
        self.layers = {i: m for i, m in model.fast_weight_memories().items() if hasattr(m, "keys")}
        if not self.layers:
            raise ValueError("the model has no FwPKM layer to inspect")
        self.writes: dict = defaultdict(list)  # (layer, slot) -> [SlotWrite]

    @torch.no_grad()
    def read(self, ids: Sequence[int], chunk_size: Optional[int] = None, segment_len: int = 2048) -> dict:
        """Read ``ids`` (one sequence) and write it into memory; chunk size defaults to the model's.
        Returns layer -> (indices [T, H, k], weights [T, H, k]) of every token's read."""
        x = torch.tensor([list(ids)], device=device_of(self.model))
        cache, run = stream(self.model, x, segment_len, keep_logits=False, chunk_size=chunk_size, record=True)
        self.model.flush(cache)
        reads = {}
        for layer, memory in self.layers.items():
            indices, weights = run.cat("indices", layer)[0].cpu(), run.cat("weights", layer)[0].cpu()
            reads[layer] = (indices, weights)
            self._record(layer, list(ids), indices, weights, chunk_size or memory.chunk_size, memory.lookahead)
        return reads

    def _record(self, layer, ids, indices, weights, chunk, lookahead):
        T, H, k = indices.shape
        for start in range(0, T, chunk):
            for t in range(start, min(T, start + chunk) - lookahead):  # the pairs this chunk wrote
                context = self._context(ids, t, lookahead)
                for h in range(H):
                    for j in range(k):
                        slot = int(indices[t, h, j])
                        self.writes[(layer, slot)].append(SlotWrite(
                            layer, slot, h, t, ids[t], ids[t + lookahead], float(weights[t, h, j]), context))

    def _context(self, ids, t, lookahead) -> str:
        a = max(0, t - self.context_chars)
        b = t + lookahead + self.context_chars
        return self.tokenizer.decode(ids[a:t]) + "[" + self.tokenizer.decode(ids[t:t + lookahead + 1]) + "]" + \
            self.tokenizer.decode(ids[t + lookahead + 1:b])

    def slot_history(self, layer: int, slot: int) -> list[SlotWrite]:
        return sorted(self.writes.get((layer, slot), []), key=lambda w: -w.weight)

    def slots_written_by(self, layer: int, target_positions: Iterable[int]) -> dict:
        """Slot -> total weight, over the pairs whose target lies in ``target_positions``."""
        memory = self.layers[layer]
        wanted = {p - memory.lookahead for p in target_positions}
        out = defaultdict(float)
        for (lay, slot), writes in self.writes.items():
            if lay == layer:
                for w in writes:
                    if w.position in wanted:
                        out[slot] += w.weight
        return dict(out)

    def _value_start(self, sample: NIAHSample, i: int) -> int:
        """Position in ``context_ids`` of needle ``i``'s first value token."""
        value_ids = sample.answer_ids if i == sample.target_index else self.tokenizer.encode(sample.values[i])
        return sample.needle_positions[i] + _find(sample.context_ids[sample.needle_positions[i]:], value_ids)

    @torch.no_grad()
    def needle(self, sample: NIAHSample, segment_len: int = 2048) -> list[dict]:
        """One memorisation pass over the haystack (one write), then the question: per layer, the
        slots the asked needle's value was written to, the slots read while answering, and their overlap;
        where the answer's read lands (``on_asked``, ``on_other``, :func:`read_weight_on`); and how far the
        answer's query is from each needle's value pair: the rank of the pair's best slot in the answer's
        ordering of all slots (``asked_rank``, ``other_rank``; below topk means read) and the cosine of
        the two queries (``asked_cos``, ``other_cos``)."""
        self.writes.clear()  # this sample's writes only
        values_at = [self._value_start(sample, i) for i in range(len(sample.values))]
        asked = values_at[sample.target_index]
        digits = range(asked, asked + len(sample.answer_ids))
        with preserved_fast_weights(self.model):
            with self.recording_queries() as written_q:
                self.read(sample.context_ids, chunk_size=len(sample.context_ids), segment_len=segment_len)
            x = torch.tensor([sample.input_ids], device=device_of(self.model))
            with self.recording_queries() as asked_q:
                _, run = stream(self.model, x, segment_len, keep_logits=False, chunk_size=x.shape[1] + 1, record=True)
        report = []
        for layer, memory in self.layers.items():
            written = self.slots_written_by(layer, digits)
            read_ids = run.cat("indices", layer)[0, -1].flatten().tolist()  # the read that predicts digit 1
            read_w = run.cat("weights", layer)[0, -1].flatten().tolist()
            q_answer, keys = asked_q[layer][0][-1][0, -1], asked_q[layer][1]  # the answer's query, the keys it met
            q_pairs = torch.cat(written_q[layer][0], dim=1)[0]
            reach = []  # per needle: (share of the answer's read, best rank, query cosine)
            for at in values_at:
                slots = self.slots_written_by(layer, [at])
                ranks = slot_ranks(q_answer, keys, sorted(slots), memory.config.score)
                q_pair = q_pairs[at - memory.lookahead]
                reach.append((read_weight_on(read_ids, read_w, slots), int(ranks.min()),
                              float(torch.nn.functional.cosine_similarity(q_answer, q_pair, dim=0))))
            mine, others = reach[sample.target_index], [r for i, r in enumerate(reach) if i != sample.target_index]
            mean = lambda j: sum(r[j] for r in others) / len(others) if others else float("nan")
            report.append({"layer": layer, "written_slots": sorted(written, key=lambda s: -written[s]),
                           "read_slots": read_ids, "overlap": sorted(set(written) & set(read_ids)),
                           "on_asked": mine[0], "on_other": mean(0), "asked_rank": mine[1], "other_rank": mean(1),
                           "asked_cos": mine[2], "other_cos": mean(2)})
        return report

    @contextmanager
    def recording_queries(self):
        """While in the block: layer -> (the queries [1, T, H*dk] of every call of its memory, in order; the keys
        the last call started from)."""
        seen = {layer: ([], None) for layer in self.layers}

        def hook(layer):
            def record(module, args, kwargs):
                seen[layer] = (seen[layer][0] + [args[0].detach().float()], module.keys.detach().clone())
            return record
        handles = [m.register_forward_pre_hook(hook(layer), with_kwargs=True) for layer, m in self.layers.items()]
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()


def slot_ranks(q: torch.Tensor, keys: torch.Tensor, slots: Sequence[int], score: str) -> torch.Tensor:
    """Rank of each slot among all n^2 slots in the read of one query (0: the best; a read selects the
    ranks 0..topk-1), the best over heads: q [H*dk], keys [H, 2, n, dk/2]; slot i * n + j scores
    s1[i] + s2[j] (spec 1.1), and its rank is the number of slots that score strictly higher."""
    H, _, n, d = keys.shape
    ids = torch.as_tensor(list(slots), dtype=torch.long)
    halves = q.double().view(H, 2, d)
    best = torch.full((len(ids),), n * n, dtype=torch.long)
    for h in range(H):
        s1, s2 = (sub_scores(halves[h, j].view(1, 1, 1, d), keys[h, j].double().unsqueeze(0), score).view(n)
                  for j in (0, 1))
        every = (s1.unsqueeze(1) + s2.unsqueeze(0)).flatten()  # n^2 doubles: 2 MiB at n = 512
        best = torch.minimum(best, (every.unsqueeze(0) > every[ids].unsqueeze(1)).sum(1))
    return best


def read_weight_on(read_ids: Sequence[int], read_weights: Sequence[float], slots) -> float:
    """Share of a read's weight (|w|) on ``slots``: for the answer's read and the slots that the pair
    predicting a needle's first value token wrote, how much of the answer is read from that needle."""
    total = sum(abs(w) for w in read_weights)
    return sum(abs(w) for i, w in zip(read_ids, read_weights) if i in slots) / total if total else 0.0


def _find(haystack: Sequence[int], needle: Sequence[int]) -> int:
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if list(haystack[i:i + n]) == list(needle):
            return i
    raise ValueError("the answer's tokens were not found in the needle")
