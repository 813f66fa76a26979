"""Fact rows: text in which associative statements are made and later recalled, in varied words.

A row is haystack text with 1-3 facts inserted in its first part and, later in the row, each fact
recalled: restated in its own words or in others, or asked and answered (``"Q: What is the shelf of
Tavo Merin? A: 417."``). Keys (people, codes, compound words, things), attributes and values (numbers
of 2-8 digits, capital or lowercase strings, words) are drawn anew for every fact, and statements and
recalls each come in many forms, so that the one thing a model can learn from them is to look up what
was said about a key, not a template. None of the needle-in-a-haystack families (lit/needles.py) is
used: no sentence, question or key format of theirs appears (``tests/test_data.py`` checks rows).
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

from lit.needles import parse_pattern
from lit.synthetic import haystack_window, insert_needles
from lit.tokenizer import Tokenizer

ATTRIBUTES = ("room", "seat", "code", "tag", "port", "batch", "score", "pin", "channel", "lot", "gate", "track", "serial",
              "quota", "level", "shelf", "slot", "frequency", "balance", "grade", "order", "ticket", "platform", "index",
              "weight", "budget", "license", "account", "route", "phone", "desk", "bin", "table", "cabin", "box")
SYLLABLES = ("ta", "vo", "mer", "in", "ka", "lu", "ri", "sen", "do", "pa", "ne", "gor", "ul", "fa", "bi", "zan", "te",
             "mo", "ra", "kel", "si", "nu", "har", "el", "vi", "to", "ber", "an", "qui", "lo", "dem", "yo")
THINGS = ("north tower", "red kettle", "old mill", "blue van", "west wing", "night train", "small boat", "main hall",
          "green door", "east dock", "lower deck", "glass house", "back office", "third bridge", "iron gate")
KEY_FORMATS = ("[A-HJ-Z][A-Z]?[0-9]{2,4}", "[A-HJ-Z]{1,3}/[0-9]{2,3}", "[a-z]{3,5}[0-9]{1,3}", "#[0-9]{3,5}",
               "[A-HJ-Z]{2}\\.[0-9]{3}", "no\\. [0-9]{2,4}", "[A-HJ-Z][0-9][a-z]{2}", "unit [0-9]{2,4}")
VALUE_FORMATS = ("[0-9]{2}", "[0-9]{3}", "[0-9]{4}", "[0-9]{5}", "[0-9]{6}", "[0-9]{7}", "[0-9]{8}", "[A-Z]{3,8}",
                 "[a-z]{3,7}", "[a-z0-9]{4,6}", "[A-Z][0-9]{2,4}", "[0-9]{1,3}\\.[0-9]{1,2}")
SHARED_TRIES = 10  # draws of a shared-form row before a row falls back to mixed forms (short rows)
# {K}: the key (capitalised where it opens a sentence), {a}: the attribute, {v}: the value
STATEMENTS = (" {K}'s {a} is {v}.", " The {a} of {k} is {v}.", " {K} has {a} {v}.", " For {k}, the {a} is {v}.",
              " {K} was assigned {a} {v}.", " Note: {k} {a} = {v}.", " We set the {a} for {k} to {v}.",
              " {K} ({a}): {v}.", " In the records, {k} is listed with {a} {v}.", " {K} -- {a} {v}.",
              " Everyone knew that the {a} of {k} was {v}.", " {K} got {a} {v} this year.")
RECALLS = (" {K}'s {a} is {v}.", " The {a} of {k} is {v}.", " Q: What is the {a} of {k}? A: {v}.",
           " Asked for the {a} of {k}, they said {v}.", " {K}, {a}: {v}.", " Looking up {k}, the {a} was {v}.",
           " Which {a} does {k} have? It has {v}.", " Again, {k} has {a} {v}.", " So the {a} for {k} is {v}.",
           " As noted, {k} ({a}) is {v}.", " Check: {k} / {a} -> {v}.", " {K} still has {a} {v}.")


def random_key(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:  # a person
        return " ".join(_word(rng, 2, 3).capitalize() for _ in range(2))
    if kind == 1:  # a code
        return parse_pattern(rng.choice(KEY_FORMATS)).draw(rng)
    if kind == 2:  # a compound word
        return f"{_word(rng, 1, 2)}{rng.choice('- ')}{_word(rng, 2, 3)}"
    return f"the {rng.choice(THINGS)}"


def random_value(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return _word(rng, 2, 3)
    return parse_pattern(rng.choice(VALUE_FORMATS)).draw(rng)


def _word(rng: random.Random, fewest: int, most: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(fewest, most)))


def render(template: str, key: str, attribute: str, value: str) -> str:
    capitalised = key[:1].upper() + key[1:]
    return template.format(K=capitalised, k=key, a=attribute, v=value)


def fact_sequence(haystack_ids: Sequence[int], tokenizer: Tokenizer, length: int, seed: int, max_facts: int = 3,
                  same_words: float = 0.3, max_fraction: float = 0.7, shared: float = 0.0,
                  recalls: int = 1) -> tuple[list[int], list[tuple[str, str, str]]]:
    """``length`` tokens: haystack text with 1 to ``max_facts`` facts in its first 45% and each one
    recalled after it; and the facts, (key, attribute, value).
    """
    sequence, facts, _ = fact_sequence_with_answers(haystack_ids, tokenizer, length, seed, max_facts, same_words,
                                                    max_fraction, shared, recalls)
    return sequence, facts


def fact_sequence_with_answers(haystack_ids: Sequence[int], tokenizer: Tokenizer, length: int, seed: int,
                               max_facts: int = 3, same_words: float = 0.3, max_fraction: float = 0.7,
                               shared: float = 0.0, recalls: int = 1
                               ) -> tuple[list[int], list[tuple[str, str, str]], list[tuple[int, int]]]:
    """:func:`fact_sequence` and the answers' spans: (start, stop) token positions of each recall's value
    in the sequence, where only a lookup of what was said about the key predicts the tokens.

    A recall repeats the fact's own sentence with probability ``same_words``, else uses another form.
    Facts and recalls take at most ``max_fraction`` of the row (fewer facts when they would not fit).
    With probability ``shared`` the row is a *shared-form* row (:func:`_shared_form_pieces`).
    With ``recalls`` > 1 each fact is recalled up to that many times, the first as above and the others in
    forms of :data:`RECALLS` that it has not used yet (fewer where they do not fit, once a row is down to
    its fewest facts), so that a recall's words rarely match any earlier mention but its key.
    """
    sequence, facts, answers, _ = fact_sequence_with_sources(haystack_ids, tokenizer, length, seed, max_facts,
                                                             same_words, max_fraction, shared, recalls)
    return sequence, facts, answers


def fact_sequence_with_sources(haystack_ids: Sequence[int], tokenizer: Tokenizer, length: int, seed: int,
                               max_facts: int = 3, same_words: float = 0.3, max_fraction: float = 0.7,
                               shared: float = 0.0, recalls: int = 1) -> tuple:
    """:func:`fact_sequence_with_answers` and, for each answer, the (start, stop) span of the same value in
    its fact's statement (the tokens a lookup of that answer should find)."""
    rng = random.Random(seed)
    drawn = None
    if shared > 0 and rng.random() < shared:
        for _ in range(SHARED_TRIES):  # about 1 draw in 5 is too long for the row: draw again
            drawn = _shared_form_pieces(rng, tokenizer, length, max(2, max_facts), same_words, max_fraction, recalls)
            if drawn:
                break
    pieces, facts = drawn or _mixed_form_pieces(rng, tokenizer, length, max_facts, same_words, max_fraction, recalls)
    used = _tokens(pieces)
    if used >= length:
        raise ValueError(f"length={length} is too short for a fact and its recall ({used} tokens)")
    statement_depths = [rng.uniform(0.0, 0.45) for _ in pieces]
    recall_depths = [rng.uniform(max(0.55, d + 0.2), 1.0) for d, (_, told) in zip(statement_depths, pieces) for _ in told]
    window = haystack_window(haystack_ids, rng.randrange(len(haystack_ids)), length - used)
    told = [(fact, recall) for fact, (_, recalls_of_fact) in enumerate(pieces) for recall in recalls_of_fact]
    inserted = [ids for (ids, _), _ in pieces] + [ids for _, (ids, _) in told]
    sequence, starts = insert_needles(window, inserted, statement_depths + recall_depths, tokenizer)
    answers = [(start + a, start + b) for start, (_, (_, (a, b))) in zip(starts[len(pieces):], told)]
    stated = [(starts[i] + a, starts[i] + b) for i, ((_, (a, b)), _) in enumerate(pieces)]
    return sequence, facts, answers, [stated[fact] for fact, _ in told]


def _piece(tokenizer: Tokenizer, statement: str, recall_forms: Sequence[str], key: str, attribute: str,
           value: str) -> tuple:
    """((statement ids, its value's span), [(recall ids, its value's span)] per recall form); a span is the
    (start, stop) of the value's tokens in the ids."""
    return _with_value(tokenizer, statement, key, attribute, value), [
        _with_value(tokenizer, form, key, attribute, value) for form in recall_forms]


def _with_value(tokenizer: Tokenizer, form: str, key: str, attribute: str, value: str) -> tuple:
    ids = tokenizer.encode(render(form, key, attribute, value))
    before = render(form[:form.index("{v}")], key, attribute, value)  # the sentence up to its value
    before_ids = tokenizer.encode(before)
    if before_ids != ids[:len(before_ids)]:  # a subword tokenizer merged the space into the value
        before_ids = tokenizer.encode(before.rstrip())
    return ids, (len(before_ids), len(tokenizer.encode(before + value)))


def _recall_forms(rng: random.Random, first: str, recalls: int) -> list[str]:
    """``first`` and ``recalls - 1`` other forms of :data:`RECALLS`, all distinct (no draw for 1 recall)."""
    if recalls == 1:
        return [first]
    others = [form for form in RECALLS if form != first]
    return [first] + rng.sample(others, min(recalls - 1, len(others)))


def _distinct_keys(rng: random.Random, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        key = random_key(rng)
        if key not in keys:
            keys.append(key)
    return keys


def _mixed_form_pieces(rng: random.Random, tokenizer: Tokenizer, length: int, max_facts: int, same_words: float,
                       max_fraction: float, recalls: int = 1) -> tuple[list[tuple], list[tuple[str, str, str]]]:
    """Each fact with its own attribute, value format and sentence forms."""
    keys = _distinct_keys(rng, rng.randint(1, max_facts))
    pieces, facts = [], []
    for key in keys:
        attribute, value, statement = rng.choice(ATTRIBUTES), random_value(rng), rng.choice(STATEMENTS)
        recall = statement if rng.random() < same_words else rng.choice(RECALLS)
        pieces.append(_piece(tokenizer, statement, _recall_forms(rng, recall, recalls), key, attribute, value))
        facts.append((key, attribute, value))
    _trim(pieces, facts, 1, int(length * max_fraction))
    return pieces, facts


def _trim(pieces: list, facts: list, fewest: int, budget: int) -> bool:
    """Drop the last facts (and their recalls) until ``fewest`` are left, then the last recalls of the facts
    recalled most often, until they fit ``budget`` tokens; whether they fit."""
    while _tokens(pieces) > budget:
        if len(pieces) > fewest:
            pieces.pop()
            facts.pop()
            continue
        most = max(range(len(pieces)), key=lambda i: (len(pieces[i][1]), i))
        if len(pieces[most][1]) == 1:
            break
        pieces[most][1].pop()
    return _tokens(pieces) <= budget


def _tokens(pieces: list) -> int:
    """Tokens of the pieces' statements and recalls."""
    return sum(len(statement) + sum(len(ids) for ids, _ in told) for (statement, _), told in pieces)


def _shared_form_pieces(rng: random.Random, tokenizer: Tokenizer, length: int, max_facts: int, same_words: float,
                        max_fraction: float, recalls: int = 1) -> Optional[tuple[list[tuple], list[tuple[str, str, str]]]]:
    """2 to ``max_facts`` facts that share one attribute, one value format and one statement form, each
    recalled in one shared form: only its key tells which value a recall asks for (a needle-in-a-haystack
    question has a distractor of its own form). None when two such facts do not fit (long keys and
    sentences)."""
    attribute, statement = rng.choice(ATTRIBUTES), rng.choice(STATEMENTS)
    recall = statement if rng.random() < same_words else rng.choice(RECALLS)
    forms = _recall_forms(rng, recall, recalls)  # shared by every fact of the row, like its statement form
    if rng.random() < 0.15:
        draw_value = lambda: _word(rng, 2, 3)  # noqa: E731
    else:
        pattern = parse_pattern(rng.choice(VALUE_FORMATS))
        draw_value = lambda: pattern.draw(rng)  # noqa: E731
    pieces, facts, values = [], [], set()
    for key in _distinct_keys(rng, rng.randint(2, max_facts)):
        value = draw_value()
        for _ in range(20):  # distinct values, else a recall does not say which fact it asks for
            if value not in values:
                break
            value = draw_value()
        values.add(value)
        pieces.append(_piece(tokenizer, statement, forms, key, attribute, value))
        facts.append((key, attribute, value))
    return (pieces, facts) if _trim(pieces, facts, 2, int(length * max_fraction)) else None
