"""Needle families for the needle-in-a-haystack evaluation, and the string patterns they draw from.

A family is a needle sentence, a question and the formats of its keys and values::

    name: vault
    needle: " Remember that the passcode of vault {key} is {value}."
    question: "Question: what is the passcode of vault {key}?\\nAnswer: "
    key: "[a-z]{2}[0-9]-[a-z][0-9]"
    value: "[0-9]{8}"

Formats are small patterns: literal characters, a class ``[a-z0-9]``, a choice ``(red|blue)``, each
optionally repeated ``{n}`` or ``{m,n}`` times; ``\\`` escapes a special character. The shipped
families (``lit/assets/needle_families.yaml``) are the spec's (section 7) and several that no training
source of this lab ever writes (``tests/test_data.py`` checks the generated training rows).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

SHIPPED_FAMILIES = Path(__file__).parent / "assets" / "needle_families.yaml"
SPEC_NAME = "spec"
SPECIAL = "[](){}|\\"


# --------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class Pattern:
    """A parsed format: a sequence of (choices, fewest, most) items."""

    text: str
    items: tuple

    def draw(self, rng: random.Random) -> str:
        return "".join(rng.choice(choices) for choices, low, high in self.items for _ in range(rng.randint(low, high)))

    @property
    def regex(self) -> str:
        """A regular expression matching exactly the strings the pattern makes."""
        return "".join("(?:" + "|".join(map(re.escape, choices)) + f"){{{low},{high}}}" for choices, low, high in self.items)

    @property
    def size(self) -> float:
        """How many strings the pattern can make (at most; repeated choices may coincide)."""
        total = 1.0
        for choices, low, high in self.items:
            total *= sum(len(choices) ** n for n in range(low, high + 1))
        return total


def parse_pattern(text: str) -> Pattern:
    """Parse a format; raises ValueError naming the pattern and the position of a mistake."""
    items, pos = [], 0
    while pos < len(text):
        char = text[pos]
        if char == "[":
            end = text.find("]", pos)
            if end < 0:
                raise ValueError(f"pattern {text!r}: '[' at {pos} is never closed")
            choices, pos = _char_class(text, text[pos + 1 : end], pos), end + 1
        elif char == "(":
            end = text.find(")", pos)
            if end < 0:
                raise ValueError(f"pattern {text!r}: '(' at {pos} is never closed")
            choices, pos = tuple(text[pos + 1 : end].split("|")), end + 1
        elif char == "\\" and pos + 1 < len(text):
            choices, pos = (text[pos + 1],), pos + 2
        elif char in SPECIAL:
            raise ValueError(f"pattern {text!r}: {char!r} at {pos} has nothing to apply to; write \\{char} for the character")
        else:
            choices, pos = (char,), pos + 1
        low = high = 1
        if pos < len(text) and text[pos] == "{":
            match = re.match(r"\{(\d+)(?:,(\d+))?\}", text[pos:])
            if not match:
                raise ValueError(f"pattern {text!r}: the repetition at {pos} must read {{n}} or {{m,n}}")
            low, high = int(match.group(1)), int(match.group(2) or match.group(1))
            if not 0 <= low <= high or high == 0:
                raise ValueError(f"pattern {text!r}: repetition {match.group(0)} must have 0 <= m <= n, n >= 1")
            pos += match.end()
        items.append((choices, low, high))
    if not items:
        raise ValueError("a pattern must not be empty")
    return Pattern(text, tuple(items))


def _char_class(text: str, body: str, pos: int) -> tuple:
    chars, i = [], 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            first, last = body[i], body[i + 2]
            if ord(first) > ord(last):
                raise ValueError(f"pattern {text!r}: range {first}-{last} at {pos + 1 + i} runs backwards")
            chars += [chr(c) for c in range(ord(first), ord(last) + 1)]
            i += 3
        else:
            chars.append(body[i])
            i += 1
    if not chars:
        raise ValueError(f"pattern {text!r}: the class at {pos} is empty")
    return tuple(dict.fromkeys(chars))


# --------------------------------------------------------------------------- families


@dataclass(frozen=True)
class NeedleFamily:
    """A needle sentence with ``{key}`` and ``{value}``, a question with ``{key}`` (the answer, the
    value, follows it), and the key and value formats."""

    name: str
    needle: str
    question: str
    key: str
    value: str
    description: str = ""

    def __post_init__(self):
        where = f"needle family {self.name!r}"
        for field_name, text, needed in (("needle", self.needle, ("{key}", "{value}")), ("question", self.question, ("{key}",))):
            for placeholder in needed:
                if text.count(placeholder) != 1:
                    raise ValueError(f"{where}: {field_name} {text!r} must hold {placeholder} once")
        if "{value}" in self.question:
            raise ValueError(f"{where}: the question {self.question!r} must not hold the answer {{value}}")
        if not self.needle[:1].isspace():
            raise ValueError(f"{where}: the needle {self.needle!r} must start with a space (it goes between sentences)")
        for field_name in ("key", "value"):
            try:
                parse_pattern(getattr(self, field_name))
            except ValueError as err:
                raise ValueError(f"{where}: {field_name}: {err}") from None
        if parse_pattern(self.key).size < 16:
            raise ValueError(f"{where}: key {self.key!r} makes fewer than 16 keys; a haystack needs distinct ones")

    def draw(self, rng: random.Random, n_needles: int) -> tuple[list[str], list[str]]:
        """``n_needles`` distinct keys and a value for each."""
        key_pattern, value_pattern = parse_pattern(self.key), parse_pattern(self.value)
        if n_needles > key_pattern.size / 4:
            raise ValueError(f"needle family {self.name!r}: {n_needles} needles need more distinct keys than {self.key!r} makes")
        keys: list[str] = []
        while len(keys) < n_needles:
            key = key_pattern.draw(rng)
            if key not in keys:
                keys.append(key)
        return keys, [value_pattern.draw(rng) for _ in keys]

    def same_needles(self, other: "NeedleFamily") -> bool:
        """Whether both make the same needles and questions (names and descriptions aside)."""
        return (self.needle, self.question, self.key, self.value) == (other.needle, other.question, other.key, other.value)

    def needle_text(self, key: str, value: str) -> str:
        return self.needle.replace("{key}", key).replace("{value}", value)

    def question_text(self, key: str) -> str:
        return self.question.replace("{key}", key)

    def fixed_phrases(self, shortest: int = 8) -> list[str]:
        """The template's literal text between placeholders, ``shortest`` characters or longer: what no
        training row may contain."""
        parts = re.split(r"\{key\}|\{value\}", self.needle) + re.split(r"\{key\}", self.question)
        return [p.strip() for p in parts if len(p.strip()) >= shortest]


def load_families(path: str | Path) -> dict[str, NeedleFamily]:
    """The families of a YAML file: a list of mappings with name, needle, question, key, value."""
    import yaml

    try:
        entries = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"needle families file {str(path)!r} cannot be read: {err}") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"needle families file {str(path)!r} must hold a list of families")
    families = {}
    for entry in entries:
        family = family_from_mapping(entry, f"needle families file {str(path)!r}")
        if family.name in families:
            raise ValueError(f"needle families file {str(path)!r} names family {family.name!r} twice")
        families[family.name] = family
    return families


def family_from_mapping(entry, where: str) -> NeedleFamily:
    fields = {"name", "needle", "question", "key", "value", "description"}
    if not isinstance(entry, dict) or not {"name", "needle", "question", "key", "value"} <= set(entry):
        raise ValueError(f"{where}: each family needs name, needle, question, key and value; got {entry!r}")
    unknown = set(entry) - fields
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} in family {entry.get('name')!r}; allowed: {sorted(fields)}")
    return NeedleFamily(**{k: str(v) for k, v in entry.items()})


def shipped_families() -> dict[str, NeedleFamily]:
    return load_families(SHIPPED_FAMILIES)


def held_out_family_names() -> list[str]:
    """The shipped families other than the spec's: the ones reported as zero-shot."""
    return [name for name in shipped_families() if name != SPEC_NAME]


def resolve_families(names: Iterable | None, option: str = "niah.families") -> list[NeedleFamily]:
    """Families by shipped name, ``all`` (every shipped family), a YAML file's path (its families), an
    inline mapping or a :class:`NeedleFamily`; None means the spec's family only."""
    shipped = shipped_families()
    if names is None:
        return [shipped[SPEC_NAME]]
    if isinstance(names, (str, dict, NeedleFamily)):
        names = [names]
    chosen: list[NeedleFamily] = []
    for item in names:
        if isinstance(item, NeedleFamily):
            chosen.append(item)
        elif isinstance(item, dict):
            chosen.append(family_from_mapping(item, option))
        elif item == "all":
            chosen += shipped.values()
        elif item in shipped:
            chosen.append(shipped[item])
        elif str(item).endswith((".yaml", ".yml")):
            chosen += load_families(item).values()
        else:
            raise ValueError(f"{option}={item!r}: choose a shipped family {sorted(shipped)}, 'all', or a .yaml file of families")
    names_seen = [f.name for f in chosen]
    if len(set(names_seen)) != len(names_seen):
        raise ValueError(f"{option}: family names repeat: {names_seen}")
    return chosen


def family_names(families: Sequence[NeedleFamily]) -> list[str]:
    return [f.name for f in families]
