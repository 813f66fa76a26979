"""Gate analysis, addressing statistics and memory inspection (spec section 7).

Inspection follows the write rule of spec 1.2: in a chunk, the pair (t, t+L) moves
every slot that token t read, with the read's weight; so the slots a pair wrote are
exactly ``indices[t]``. :class:`MemoryInspector` records those writes per slot.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from fwpkm import HybridLM
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
        and where the answer's read lands (``on_asked``, ``on_other``, :func:`read_weight_on`)."""
        self.writes.clear()  # this sample's writes only
        values_at = [self._value_start(sample, i) for i in range(len(sample.values))]
        asked = values_at[sample.target_index]
        digits = range(asked, asked + len(sample.answer_ids))
        with preserved_fast_weights(self.model):
            self.read(sample.context_ids, chunk_size=len(sample.context_ids), segment_len=segment_len)
            x = torch.tensor([sample.input_ids], device=device_of(self.model))
            _, run = stream(self.model, x, segment_len, keep_logits=False, chunk_size=x.shape[1] + 1, record=True)
        report = []
        for layer in self.layers:
            written = self.slots_written_by(layer, digits)
            read_ids = run.cat("indices", layer)[0, -1].flatten().tolist()  # the read that predicts digit 1
            read_w = run.cat("weights", layer)[0, -1].flatten().tolist()
            others = [read_weight_on(read_ids, read_w, self.slots_written_by(layer, [at]))
                      for i, at in enumerate(values_at) if i != sample.target_index]
            report.append({"layer": layer, "written_slots": sorted(written, key=lambda s: -written[s]),
                           "read_slots": read_ids, "overlap": sorted(set(written) & set(read_ids)),
                           "on_asked": read_weight_on(read_ids, read_w, self.slots_written_by(layer, [asked])),
                           "on_other": sum(others) / len(others) if others else float("nan")})
        return report


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
