"""Tokenizers behind one small interface: ``encode``, ``decode``, ``vocab_size``, ``eos_id``.

``"byte"`` (the default) needs nothing: ids 0..255 are the UTF-8 bytes, then EOS and PAD.
``"ids:N"`` is for synthetic token tasks (MQAR): ids 0..N-1 are used as they are, text has none.
Any other name is loaded with ``transformers.AutoTokenizer`` from local files only: there
is no network at run time, so a tokenizer must already be in the local cache or be a
local directory.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Tokenizer(Protocol):
    name: str
    eos_id: int
    pad_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens. ``vocab_size`` is rounded up to a multiple of 8."""

    name = "byte"
    n_bytes = 256
    eos_id = 256
    pad_id = 257

    @property
    def vocab_size(self) -> int:
        n_used = self.pad_id + 1
        return (n_used + 7) // 8 * 8

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < self.n_bytes)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class IdTokenizer:
    """``ids:N``: token ids ``0..N-1`` as they are (synthetic tasks), then EOS and PAD; ``vocab_size``
    is rounded up to a multiple of 8. Text cannot be encoded with it."""

    def __init__(self, n_ids: int):
        self.n_ids = int(n_ids)
        self.name = f"ids:{self.n_ids}"
        self.eos_id, self.pad_id = self.n_ids, self.n_ids + 1

    @property
    def vocab_size(self) -> int:
        return (self.pad_id + 1 + 7) // 8 * 8

    def encode(self, text: str) -> list[int]:
        raise ValueError(f"tokenizer {self.name!r} has no text: it is for synthetic token tasks such as data.source=mqar")

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def __repr__(self) -> str:
        return f"IdTokenizer({self.n_ids})"


class HFTokenizer:
    """A ``transformers`` tokenizer seen through the small interface above."""

    def __init__(self, name: str, tokenizer):
        self.name = name
        self.inner = tokenizer
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = tokenizer.sep_token_id
        if eos is None:
            raise ValueError(f"tokenizer {name!r} defines no EOS (or SEP) token; documents cannot be separated")
        self.eos_id = int(eos)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return len(self.inner)

    def encode(self, text: str) -> list[int]:
        return list(self.inner.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.inner.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r})"


def load_tokenizer(name: str, option: str = "tokenizer") -> ByteTokenizer | IdTokenizer | HFTokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; ``"ids:N"`` -> :class:`IdTokenizer`; otherwise a local
    ``transformers`` tokenizer.

    Errors are ``ValueError``s that name ``option`` (the config option that gave ``name``).
    """
    if name == "byte":
        return ByteTokenizer()
    if name.startswith("ids:"):
        count = name[len("ids:"):]
        if not count.isdigit() or int(count) < 4:
            raise ValueError(f"{option}={name!r}: expected ids:N with N >= 4 token ids, e.g. ids:4096")
        return IdTokenizer(int(count))
    offline_hint = (
        f"{option}={name!r} could not be loaded: only 'byte' or a tokenizer available locally "
        "(a local directory or one already in the Hugging Face cache) works, since there is no "
        "network at run time"
    )
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ValueError(f"{offline_hint}; moreover `transformers` is not installed") from err
    try:
        inner = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{offline_hint} ({type(err).__name__}: {err})") from err
    return HFTokenizer(name, inner)
