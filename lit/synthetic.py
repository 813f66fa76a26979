"""Synthetic long-range recall tasks, all deterministic given a seed.

* Needle in a haystack (spec section 7): needles ``" The secret number for ID-3F9A is
  042137."`` are inserted into a haystack of text; the question ``"The secret number for
  ID-3F9A is "`` asks for one of them and the answer is its 6 digits.
  :func:`make_niah_sample` builds one evaluation sample, :func:`score_answer` scores a
  decoded answer, :func:`niah_training_sequence` builds fixed-length training sequences in
  the same format with the answers included (so a language model can learn to copy).
* Repeated spans (:func:`repeated_span_sequence`): a span of text that comes back later in
  the sequence, the repetition of long documents from which a model learns to copy from
  its memory.
* Associative recall: key-value token pairs, then queried keys each followed by its value
  (:func:`associative_recall_sequence`, :func:`associative_recall_batch`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from lit.needles import NeedleFamily
from lit.tokenizer import Tokenizer

NEEDLE_TEMPLATE = " The secret number for {key} is {value}."
QUESTION_TEMPLATE = "The secret number for {key} is "
SPEC_FAMILY = NeedleFamily("spec", NEEDLE_TEMPLATE, QUESTION_TEMPLATE, key="ID-[0-9A-F]{4}", value="[0-9]{6}")
SEPARATOR = "\n"  # ends the context, before the question
ANSWER_DIGITS = 6
IGNORE_INDEX = -100  # label of positions that carry no loss (torch cross_entropy default)
SENTENCE_ENDS = (".", "!", "?")

Haystack = Union[str, Sequence[int]]


# --------------------------------------------------------------------------- needles


def random_needles(rng: random.Random, n_needles: int) -> tuple[list[str], list[str]]:
    """``n_needles`` distinct keys ``"ID-" + 4 uppercase hex`` and 6-digit values."""
    if not 1 <= n_needles <= 16**4:
        raise ValueError(f"n_needles={n_needles} must be between 1 and {16**4}")
    keys = [f"ID-{code:04X}" for code in rng.sample(range(16**4), n_needles)]
    values = [f"{rng.randrange(10**ANSWER_DIGITS):0{ANSWER_DIGITS}d}" for _ in keys]
    return keys, values


def needle_text(key: str, value: str) -> str:
    return NEEDLE_TEMPLATE.format(key=key, value=value)


def question_text(key: str) -> str:
    return QUESTION_TEMPLATE.format(key=key)


# --------------------------------------------------------------------------- haystack


def haystack_window(haystack_ids: Sequence[int], start: int, n_tokens: int) -> list[int]:
    """``n_tokens`` tokens of the haystack from ``start`` on, wrapping around at its end."""
    if len(haystack_ids) == 0:
        raise ValueError("the haystack is empty")
    start %= len(haystack_ids)
    window = _as_list(haystack_ids[start : start + n_tokens])
    while len(window) < n_tokens:
        window += _as_list(haystack_ids[: n_tokens - len(window)])
    return window


def _as_list(ids: Sequence[int]) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


def _is_boundary(ids: Sequence[int], pos: int, tokenizer: Tokenizer, sentence: bool) -> bool:
    """Whether inserting at ``pos`` (before ``ids[pos]``) falls before a space (after a sentence)."""
    if pos <= 0 or pos >= len(ids):
        return True
    previous = tokenizer.decode([ids[pos - 1]])
    # decode the pair: tokenizers that drop a leading space on a lone token keep it here
    following = tokenizer.decode([ids[pos - 1], ids[pos]])[len(previous) :]
    # needles start with a space and end with ".", so the text after them must start with one
    if not following[:1].isspace():
        return False
    return not sentence or previous.rstrip().endswith(SENTENCE_ENDS)


def snap_to_boundary(ids: Sequence[int], target: int, tokenizer: Tokenizer, lo: int, hi: int, window: int) -> int:
    """The position in ``[lo, hi]`` nearest ``target`` that ends a sentence, else one between
    words, searched within ``window`` tokens; ``target`` itself (clamped) if there is none."""
    target = min(max(target, lo), hi)
    for sentence in (True, False):
        for distance in range(window + 1):
            for pos in (target - distance, target + distance):
                if lo <= pos <= hi and _is_boundary(ids, pos, tokenizer, sentence):
                    return pos
    return target


def insert_needles(
    haystack_ids: Sequence[int],
    needles_ids: Sequence[Sequence[int]],
    depths: Sequence[float],
    tokenizer: Tokenizer,
    snap_window: int = 64,
) -> tuple[list[int], list[int]]:
    """Insert needle ``i`` so that it starts at relative depth ``depths[i]`` of the result.

    Depth 0 puts a needle first, depth 1 makes it end where the result ends. Returns the
    token ids and the start offset of every needle (in the order given).
    """
    total = len(haystack_ids) + sum(len(n) for n in needles_ids)
    order = sorted(range(len(needles_ids)), key=lambda i: depths[i])
    cuts: dict[int, int] = {}
    lowest_cut, inserted = 0, 0
    for i in order:
        wanted_start = round(depths[i] * (total - len(needles_ids[i])))
        cut = snap_to_boundary(haystack_ids, wanted_start - inserted, tokenizer, lowest_cut, len(haystack_ids), snap_window)
        cuts[i], lowest_cut = cut, cut
        inserted += len(needles_ids[i])

    out: list[int] = []
    positions = [0] * len(needles_ids)
    previous_cut = 0
    for i in order:
        out += haystack_ids[previous_cut : cuts[i]]
        positions[i] = len(out)
        out += needles_ids[i]
        previous_cut = cuts[i]
    out += haystack_ids[previous_cut:]
    return out, positions


# --------------------------------------------------------------------------- evaluation samples


@dataclass
class NIAHSample:
    """One needle-in-a-haystack sample; the model reads ``context_ids + question_ids``."""

    context_ids: list[int]  # haystack with the needles, ending with the separator
    question_ids: list[int]
    answer: str  # the value asked for (the spec's: 6 digits)
    answer_ids: list[int]
    keys: list[str]
    values: list[str]
    depths: list[float]  # actual relative start of each needle in the haystack, in tokens
    needle_positions: list[int]  # token offset of each needle in context_ids
    target_index: int  # which needle the question asks for

    @property
    def input_ids(self) -> list[int]:
        return self.context_ids + self.question_ids


def _check_depths(depths: Sequence[float], n_needles: int) -> list[float]:
    depths = [float(d) for d in depths]
    if len(depths) != n_needles:
        raise ValueError(f"depths has {len(depths)} values but n_needles={n_needles}")
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths={depths} must all lie in [0, 1]")
    return depths


def make_niah_sample(
    haystack: Haystack,
    tokenizer: Tokenizer,
    n_needles: int = 5,
    depths: Sequence[float] | None = None,
    seed: int = 0,
    context_len: int = 4096,
    target_index: int | None = None,
    haystack_start: int | None = 0,
    snap_window: int = 64,
    family: NeedleFamily | None = None,
) -> NIAHSample:
    """A haystack of ``context_len`` tokens (question included) with ``n_needles`` needles of
    ``family`` (default: the spec's, :data:`NEEDLE_TEMPLATE`; see :mod:`lit.needles`).

    ``haystack`` is text or token ids; it is read from ``haystack_start`` (random when None)
    and wraps around when too short. ``depths`` (in [0, 1], one per needle) default to
    uniform random; ``target_index`` (the needle asked for) defaults to random. Needles go
    to the nearest sentence end (else word boundary) within ``snap_window`` tokens.
    ``len(context_ids) + len(question_ids) == context_len``.
    """
    rng = random.Random(seed)
    if family is None or family.same_needles(SPEC_FAMILY):  # drawn as before families existed
        keys, values = random_needles(rng, n_needles)
        needle, question = needle_text, question_text
    else:
        keys, values = family.draw(rng, n_needles)
        needle, question = family.needle_text, family.question_text
    depths = [rng.random() for _ in keys] if depths is None else _check_depths(depths, n_needles)
    if target_index is None:
        target_index = rng.randrange(n_needles)
    if not 0 <= target_index < n_needles:
        raise ValueError(f"target_index={target_index} must be in [0, {n_needles})")

    needles_ids = [tokenizer.encode(needle(k, v)) for k, v in zip(keys, values)]
    separator_ids = tokenizer.encode(SEPARATOR)
    question_ids = tokenizer.encode(question(keys[target_index]))
    fixed = sum(map(len, needles_ids)) + len(separator_ids) + len(question_ids)
    if context_len <= fixed:
        raise ValueError(f"context_len={context_len} leaves no room for a haystack: needles and question take {fixed} tokens")

    haystack_ids = tokenizer.encode(haystack) if isinstance(haystack, str) else haystack
    start = rng.randrange(max(len(haystack_ids), 1)) if haystack_start is None else haystack_start
    window = haystack_window(haystack_ids, start, context_len - fixed)
    with_needles, positions = insert_needles(window, needles_ids, depths, tokenizer, snap_window)
    actual_depths = [p / (len(with_needles) - len(n)) for p, n in zip(positions, needles_ids)]

    answer = values[target_index]
    return NIAHSample(
        context_ids=with_needles + separator_ids,
        question_ids=question_ids,
        answer=answer,
        answer_ids=tokenizer.encode(answer),
        keys=keys,
        values=values,
        depths=actual_depths,
        needle_positions=positions,
        target_index=target_index,
    )


def niah_eval_set(
    haystack: Haystack,
    tokenizer: Tokenizer,
    context_len: int,
    n_samples: int,
    seed: int = 0,
    n_needles: int = 5,
) -> list[NIAHSample]:
    """``n_samples`` samples with random haystack windows, depths and targets."""
    haystack_ids = tokenizer.encode(haystack) if isinstance(haystack, str) else haystack
    return [
        make_niah_sample(haystack_ids, tokenizer, n_needles, None, seed=hash_seed(seed, "niah-eval", i),
                         context_len=context_len, haystack_start=None)
        for i in range(n_samples)
    ]


def score_answer(predicted_text: str, answer: str) -> tuple[bool, float]:
    """(exact match, fraction of the answer's characters right: "digit accuracy") of a decoded answer.

    Only the first ``len(answer)`` characters after leading whitespace count, so trailing
    text is ignored and a short prediction loses the missing positions.
    """
    predicted = predicted_text.lstrip()[: len(answer)]
    matching = sum(p == a for p, a in zip(predicted, answer))
    return predicted == answer, matching / len(answer)


# --------------------------------------------------------------------------- training sequences


def hash_seed(seed: int, stream: str, index: int) -> int:
    """A deterministic seed for item ``index`` of a named stream (e.g. "train", "val")."""
    return random.Random(f"{seed}/{stream}/{index}").getrandbits(63)


def niah_training_sequence(
    haystack_ids: Sequence[int],
    tokenizer: Tokenizer,
    length: int,
    seed: int,
    n_needles: int = 5,
    snap_window: int = 64,
    max_fraction: float = 0.5,
) -> list[int]:
    """``length`` tokens: haystack with needles, then every needle asked and answered.

    Layout: ``haystack+needles`` then, for each needle in random order, ``"\\n" + question
    + answer + "."``. Needles and questions take at most ``max_fraction`` of the sequence:
    fewer than ``n_needles`` are used when they would not fit (at least one).
    """
    if not 0.0 < max_fraction < 1.0:
        raise ValueError(f"max_fraction={max_fraction} must be in (0, 1)")
    rng = random.Random(seed)
    keys, values = random_needles(rng, n_needles)
    separator_ids, period_ids = tokenizer.encode(SEPARATOR), tokenizer.encode(".")
    needles_ids = [tokenizer.encode(needle_text(k, v)) for k, v in zip(keys, values)]
    qa_ids = [separator_ids + tokenizer.encode(question_text(k)) + tokenizer.encode(v) + period_ids
              for k, v in zip(keys, values)]
    costs = [len(n) + len(q) for n, q in zip(needles_ids, qa_ids)]
    n_used = n_needles
    while n_used > 1 and sum(costs[:n_used]) > int(length * max_fraction):
        n_used -= 1
    if sum(costs[:n_used]) >= length:
        raise ValueError(f"length={length} is too short for a needle and its question ({costs[0]} tokens)")

    depths = [rng.random() for _ in range(n_used)]
    window = haystack_window(haystack_ids, rng.randrange(len(haystack_ids)), length - sum(costs[:n_used]))
    sequence, _ = insert_needles(window, needles_ids[:n_used], depths, tokenizer, snap_window)
    for i in rng.sample(range(n_used), n_used):
        sequence += qa_ids[i]
    return sequence


def repeated_span_sequence(haystack_ids: Sequence[int], length: int, seed: int, min_span: int = 64) -> list[int]:
    """``length`` tokens of haystack text in which one span occurs twice.

    Layout: ``span + gap + span + tail``, the span ``min_span`` to ``length // 2`` tokens
    long, the gap 0 to ``length - 2 * span`` tokens, gap and tail taken from elsewhere in
    the haystack. Past the first copy every token of the second one is predictable from
    memory alone, however short the attention window.
    """
    if not 1 <= min_span <= length // 2:
        raise ValueError(f"length={length} is too short for two spans of min_span={min_span} tokens")
    rng = random.Random(seed)
    span_len = rng.randint(min_span, length // 2)
    gap_len = rng.randint(0, length - 2 * span_len)
    start = rng.randrange(len(haystack_ids))
    span = haystack_window(haystack_ids, start, span_len)
    rest = haystack_window(haystack_ids, start + span_len + rng.randrange(len(haystack_ids)), length - 2 * span_len)
    return span + rest[:gap_len] + span + rest[gap_len:]


# --------------------------------------------------------------------------- associative recall


def associative_recall_sequence(
    seq_len: int,
    n_pairs: int = 16,
    n_queries: int | None = None,
    vocab_size: int = 256,
    seed: int = 0,
) -> dict[str, list[int]]:
    """``k1 v1 ... kn vn SEP q1 a1 ... qm am PAD...`` as next-token-prediction data.

    Keys come from ids ``[1, vocab_size // 2)``, values from ``[vocab_size // 2,
    vocab_size)``, 0 is the separator and padding. ``labels`` are the inputs shifted by one
    with every position ignored (-100) except those predicting a queried value.
    """
    n_queries = n_pairs if n_queries is None else n_queries
    half = vocab_size // 2
    if not 1 <= n_pairs < half:
        raise ValueError(f"n_pairs={n_pairs} must be in [1, {half - 1}] for vocab_size={vocab_size}")
    needed = 2 * n_pairs + 1 + 2 * n_queries
    if needed > seq_len + 1:
        raise ValueError(f"seq_len={seq_len} is too short for {n_pairs} pairs and {n_queries} queries ({needed - 1} needed)")

    rng = random.Random(seed)
    keys = rng.sample(range(1, half), n_pairs)
    values = [rng.randrange(half, vocab_size) for _ in keys]
    queried = rng.sample(range(n_pairs), n_queries) if n_queries <= n_pairs else [rng.randrange(n_pairs) for _ in range(n_queries)]

    tokens = [t for pair in zip(keys, values) for t in pair] + [0]
    answer_positions = []  # positions in `tokens` whose next token is a queried value
    for i in queried:
        tokens.append(keys[i])
        answer_positions.append(len(tokens) - 1)
        tokens.append(values[i])
    tokens += [0] * (seq_len + 1 - len(tokens))

    labels = [IGNORE_INDEX] * seq_len
    for pos in answer_positions:
        labels[pos] = tokens[pos + 1]
    return {"input_ids": tokens[:-1], "labels": labels}


def associative_recall_batch(
    batch_size: int,
    seq_len: int,
    n_pairs: int = 16,
    n_queries: int | None = None,
    vocab_size: int = 256,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``batch_size`` associative-recall rows as LongTensors ``[batch_size, seq_len]``."""
    rows = [
        associative_recall_sequence(seq_len, n_pairs, n_queries, vocab_size, hash_seed(seed, "recall", row))
        for row in range(batch_size)
    ]
    return {name: torch.tensor([row[name] for row in rows], dtype=torch.long) for name in ("input_ids", "labels")}


# --------------------------------------------------------------------------- multi-query associative recall


def mqar_sequence(seq_len: int, n_pairs: Union[int, Sequence[int]], vocab_size: int, power_a: float = 0.01,
                  seed: int = 0) -> dict[str, list[int]]:
    """Multi-query associative recall (MQAR; Arora et al., "Zoology", 2023) as next-token prediction.

    ``k1 v1 k2 v2 ... kn vn`` (keys from ``[1, vocab_size // 2)``, values from ``[vocab_size // 2,
    vocab_size)``, both drawn without replacement), then every key once more as a query in the
    rest of the row, at even offsets ``2 * g`` after the pairs, the gaps ``g`` drawn without
    replacement with probability proportional to ``g ** (power_a - 1)`` (``power_a`` = 0.01 puts
    most queries soon after the pairs, some far). Each query's value follows it; every other
    position is 0. ``labels`` hold the queried values at the queries' positions and -100
    elsewhere: the loss and the accuracy are on the answers only.

    As Zoology's ``multiquery_ar``, except: ``n_pairs`` may be a list, one drawn per row (a
    mixture of recall loads in one training set); rows are generated on the fly from
    ``seed``; a query's answer follows it in the input too (as in Zoology's inputs); the
    filler is always 0 (Zoology's ``random_non_queries=False``).
    """
    rng = random.Random(seed)
    n = rng.choice(list(n_pairs)) if isinstance(n_pairs, (list, tuple)) else int(n_pairs)
    half = vocab_size // 2
    if not 1 <= n < half:
        raise ValueError(f"{n} pairs need more than {n} keys: vocab_size={vocab_size} has {half - 1}")
    space = (seq_len - 2 * n) // 2
    if space < n:
        raise ValueError(f"seq_len={seq_len} is too short for {n} pairs and their queries (needs >= {4 * n})")
    keys = rng.sample(range(1, half), n)
    values = rng.sample(range(half, vocab_size), n)
    weights = [g ** (power_a - 1) for g in range(1, space + 1)]
    gaps = _sample_without_replacement(rng, weights, n)
    tokens = [t for pair in zip(keys, values) for t in pair] + [0] * (seq_len + 1 - 2 * n)
    labels = [IGNORE_INDEX] * seq_len
    for key, value, gap in zip(keys, values, gaps):
        position = 2 * n + 2 * gap
        tokens[position], tokens[position + 1] = key, value
        labels[position] = value
    return {"input_ids": tokens[:seq_len], "labels": labels}


def _sample_without_replacement(rng: random.Random, weights: list[float], k: int) -> list[int]:
    """``k`` distinct indices drawn with probabilities proportional to ``weights`` (Efraimidis-Spirakis keys)."""
    keyed = sorted(range(len(weights)), key=lambda i: rng.random() ** (1.0 / weights[i]), reverse=True)
    return keyed[:k]
