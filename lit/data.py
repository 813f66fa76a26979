"""Training and validation data: sources, tokenization, packing, and a resumable DataModule.

Sources (``DataConfig.source`` and each entry of ``DataConfig.val_sources``):

* ``embedded``: the corpus shipped in ``lit/assets`` (Python's own documentation);
* ``niah``: synthetic needle-in-a-haystack sequences (haystack: ``niah_haystack``);
* ``recall``: synthetic associative recall (pairs, then the queries one after the other);
* ``mqar``: multi-query associative recall as in Zoology (``lit.synthetic.mqar_sequence``: queries
  at power-law distances after the pairs), with ``data.tokenizer: ids:<N>`` for its token ids;
* ``hf:<dataset>[:<config>][@<split>]``: anything ``datasets.load_dataset`` opens, e.g. a
  local dataset directory or a dataset already in the local cache (no network at run time);
* a local ``.jsonl``/``.json``/``.txt``/``.parquet`` file, a directory of them, or a glob
  (read with the ``json``/``text``/``parquet`` builders of ``datasets``; a .txt file gives
  one document per blank-line separated paragraph).

Text is tokenized per document, each document followed by EOS, concatenated and cut into
rows of ``seq_len + 1`` tokens: ``input_ids = row[:-1]``, ``labels = row[1:]``. Synthetic
rows may carry label -100 (no loss) where nothing is to be predicted.

Validation: the main source holds out ``val_fraction`` of its documents (the text sources)
or has its own sample stream (``niah``, ``recall``). A val source is used whole when it is
a file or ``hf:`` source, and contributes its held-out part otherwise.

Resuming: epoch ``e`` visits the train rows in a permutation drawn from (seed, e). The
DataModule counts the training batches that reach the model (``on_before_batch_transfer``)
and every new pass over the train loader starts right after the last consumed batch, so
the batch stream is one fixed sequence however the run is cut: ``state_dict()`` (which
Lightning writes into checkpoints) stores (epoch, batches consumed), and after
``load_state_dict()`` the loader continues with the next unseen batch. Lightning's own
epoch number is not used for the order (it calls a fit stopped by ``max_steps`` a finished
epoch).

Data parallel: with ``W`` ranks each step reads one global batch of ``W x data.batch_size``
rows, the next slice of the epoch's permutation, and rank ``r`` gets its ``r``-th part, so the
ranks read disjoint rows and together the rows one process with the global batch would read.
The position (epoch, global batches consumed) is the same on every rank. A checkpoint
resumed with another global batch (other devices or batch size) continues at the same row of
the permutation when that row starts a global batch of the new size, and is refused with the
numbers otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import itertools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, default_collate

from fwpkm.config import ConfigError, check_positive, from_mapping
from lit.facts import fact_sequence_with_sources
from lit.synthetic import (associative_recall_sequence, hash_seed, mqar_sequence, niah_training_sequence,
                           repeated_span_sequence)
from lit.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

ASSET_DIR = Path(__file__).parent / "assets"
DOCUMENT_SEPARATOR = "\n\n\n"  # between documents of the embedded corpus
HAYSTACK_SEPARATOR = "\n\n"  # between documents of a NIAH haystack

NAMED_SOURCES = ("embedded", "niah", "recall", "mqar")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
SOURCE_FORMS = (
    "allowed forms: 'embedded', 'niah', 'recall', 'mqar', 'hf:<dataset>[:<config>][@<split>]', "
    "or a local .jsonl/.json/.txt/.parquet file, a directory of them, or a glob"
)


# --------------------------------------------------------------------------- embedded corpus


def embedded_text() -> str:
    """The default corpus that ships with the project (see ``lit/assets/make_embedded.py``)."""
    plain, packed = ASSET_DIR / "embedded.txt", ASSET_DIR / "embedded.txt.gz"
    if plain.exists():
        return plain.read_text(encoding="utf-8")
    with gzip.open(packed, "rt", encoding="utf-8") as handle:
        return handle.read()


def embedded_documents() -> list[str]:
    return [doc.strip() for doc in embedded_text().split(DOCUMENT_SEPARATOR) if doc.strip()]


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source string."""

    text: str  # as given
    kind: str  # embedded | niah | recall | mqar | hf | files
    dataset: Optional[str] = None  # hf
    config: Optional[str] = None  # hf
    split: str = "train"  # hf
    builder: Optional[str] = None  # files: json | text | parquet
    files: tuple[str, ...] = ()  # files

    @property
    def is_text(self) -> bool:
        return self.kind in ("embedded", "hf", "files")

    @property
    def label(self) -> str:
        """A short name for logs: no slashes or colons."""
        name = self.text[3:] if self.kind == "hf" else self.text
        if self.kind == "files":
            name = Path(name.rstrip("/")).name
        return re.sub(r"[^A-Za-z0-9_.@-]+", "_", name).strip("_") or self.kind


def parse_source(source: str, option: str = "source") -> SourceSpec:
    """Parse and check a source string; raises :class:`ConfigError` naming ``option``."""
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{option}={source!r} must be a non-empty string; {SOURCE_FORMS}")
    if source in NAMED_SOURCES:
        return SourceSpec(source, source)
    if source.startswith("hf:"):
        return _parse_hf(source, option)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", source) and not os.path.exists(source):
        raise ConfigError(f"{option}={source!r} has an unknown scheme; {SOURCE_FORMS}")
    return _parse_local(source, option)


def _parse_hf(source: str, option: str) -> SourceSpec:
    rest, split = source[3:], "train"
    if "@" in rest:
        rest, split = rest.rsplit("@", 1)
    dataset, _, config = rest.partition(":")
    if not dataset or not split:
        raise ConfigError(f"{option}={source!r} names no dataset or split; {SOURCE_FORMS}")
    return SourceSpec(source, "hf", dataset=dataset, config=config or None, split=split)


def _parse_local(source: str, option: str) -> SourceSpec:
    files = _local_files(source, option)
    builders = sorted({FILE_BUILDERS[Path(f).suffix.lower()] for f in files})
    if len(builders) > 1:
        raise ConfigError(f"{option}={source!r} mixes file formats ({builders}); use one format per source")
    return SourceSpec(source, "files", builder=builders[0], files=tuple(files))


def _local_files(source: str, option: str) -> list[str]:
    def supported(path: str) -> bool:
        return os.path.isfile(path) and Path(path).suffix.lower() in FILE_BUILDERS

    if any(ch in source for ch in "*?["):
        files = sorted(f for f in glob.glob(source, recursive=True) if supported(f))
        problem = "matches no .jsonl/.json/.txt/.parquet file"
    elif os.path.isdir(source):
        files = sorted(f for f in glob.glob(os.path.join(source, "**", "*"), recursive=True) if supported(f))
        problem = "is a directory without .jsonl/.json/.txt/.parquet files"
    elif os.path.isfile(source):
        files = [source] if supported(source) else []
        problem = f"is a file of an unsupported type {Path(source).suffix!r}"
    elif Path(source).suffix.lower() in FILE_BUILDERS:
        files, problem = [], "does not exist (file not found)"
    else:
        files, problem = [], "is neither a known source name nor an existing file, directory or glob"
    if not files:
        raise ConfigError(f"{option}={source!r} {problem}; {SOURCE_FORMS}")
    return files


# --------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    """What to train and validate on; validates itself, errors name the option."""

    source: str = "embedded"
    tokenizer: str = "byte"
    seq_len: int = 256
    batch_size: int = 8
    val_fraction: float = 0.05  # share of documents held out (text sources); 0 = no main val set
    val_sources: list[str] = field(default_factory=list)  # extra validation sets
    seed: int = 0
    num_workers: int = 0
    text_field: str = "text"  # column of json/parquet/hf rows that holds the text
    max_documents: Optional[int] = None  # read at most this many documents per text source
    streaming: bool = False  # hf/file sources: stream instead of preparing an Arrow cache
    cache_dir: Optional[str] = None  # datasets cache (default: the datasets library's)
    # needle in a haystack (spec section 7)
    niah_fraction: float = 0.0  # share of training rows that are NIAH sequences (text sources)
    niah_needles: int = 5  # needles per NIAH sequence (fewer if they do not fit)
    niah_max_fraction: float = 0.5  # most of a NIAH sequence that needles and questions may take
    niah_haystack: str = "embedded"  # text source the `niah` source takes its haystack from
    # repeated spans: rows in which a span of the training text comes back later in the row
    repeat_fraction: float = 0.0  # share of training rows that are repeated-span rows (text sources)
    repeat_min_span: int = 64  # shortest repeated span, in tokens (the longest is seq_len // 2)
    # fact rows (lit.facts): statements about keys in the text, recalled later in other words; no NIAH template
    facts_fraction: float = 0.0  # share of training rows that are fact rows (text sources)
    facts_per_row: int = 3  # most facts in a fact row (1 to this many; fewer when they do not fit)
    facts_same_words: float = 0.3  # share of recalls that restate the fact in its own words
    facts_shared: float = 0.0  # share of fact rows whose 2+ facts share attribute, value format and sentence forms
    facts_recalls: int = 1  # most recalls of each fact, each in another form (fewer where they do not fit)
    # weight of the training loss on the tokens of fact recalls' values (1 = none; not the paper's: a lab knob
    # for the lookup signal, which only those tokens carry); batches then hold "loss_weights" [B, T]
    facts_answer_weight: float = 1.0
    # weight of a contrastive loss that pulls the memory query before each recalled value token toward the query
    # before the same token in the fact's statement, among the row's earlier positions (0 = none; not the paper's:
    # a lab knob, a supervised address); batches then hold "query_pairs" [B, MAX_QUERY_PAIRS, 2], "query_weight" [B, 1]
    facts_query_weight: float = 0.0
    # synthetic sources (`niah`, `recall`)
    synthetic_train_size: int = 8192  # rows per epoch
    synthetic_val_size: int = 256
    recall_pairs: int = 16
    recall_queries: Optional[int] = None  # default: recall_pairs
    recall_vocab: int = 256  # token ids used by the recall task
    # multi-query associative recall (`mqar`; lit.synthetic.mqar_sequence)
    mqar_pairs: list[int] = field(default_factory=lambda: [8, 16, 32, 64])  # key-value pairs per row (one drawn)
    mqar_vocab: int = 2100  # ids of keys (first half) and values (second half): up to 1,049 pairs; <= the tokenizer's
    mqar_power_a: float = 0.01  # query distances ~ g^(power_a - 1): small values put most queries close

    def __post_init__(self):
        self.val_sources = self._as_list(self.val_sources)
        for name in ("seq_len", "batch_size", "niah_needles", "synthetic_train_size", "synthetic_val_size", "recall_pairs",
                     "repeat_min_span", "facts_per_row", "facts_recalls", "facts_answer_weight"):
            check_positive(f"data.{name}", getattr(self, name))
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction!r} must be in [0, 1)")
        if not 0.0 <= self.niah_fraction < 1.0:
            raise ConfigError(f"data.niah_fraction={self.niah_fraction!r} must be in [0, 1)")
        for name in ("repeat_fraction", "facts_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"data.{name}={getattr(self, name)!r} must be in [0, 1)")
        if self.facts_query_weight < 0:
            raise ConfigError(f"data.facts_query_weight={self.facts_query_weight!r} must be >= 0")
        for name in ("facts_same_words", "facts_shared"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"data.{name}={getattr(self, name)!r} must be in [0, 1]")
        generated = self.niah_fraction + self.repeat_fraction + self.facts_fraction
        if generated >= 1.0:
            raise ConfigError(
                f"data.niah_fraction + data.repeat_fraction + data.facts_fraction = {generated!r} must be < 1: "
                "some rows must be plain text"
            )
        if self.repeat_fraction > 0 and 2 * self.repeat_min_span > self.seq_len + 1:
            raise ConfigError(
                f"data.repeat_min_span={self.repeat_min_span} is too long for data.seq_len={self.seq_len}: "
                "two spans must fit in a row (2 * repeat_min_span <= seq_len + 1)"
            )
        if not 0.0 < self.niah_max_fraction < 1.0:
            raise ConfigError(f"data.niah_max_fraction={self.niah_max_fraction!r} must be in (0, 1)")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers!r} must be >= 0")
        if self.max_documents is not None:
            check_positive("data.max_documents", self.max_documents)
        if not self.text_field:
            raise ConfigError("data.text_field must name a column, e.g. 'text'")
        self._check_sources()
        self._check_recall()
        self._check_mqar()

    @staticmethod
    def _as_list(val_sources) -> list[str]:
        if isinstance(val_sources, str) or not isinstance(val_sources, (list, tuple)):
            raise ConfigError(f"data.val_sources={val_sources!r} must be a list of source strings; {SOURCE_FORMS}")
        return list(val_sources)

    def _check_sources(self) -> None:
        parse_source(self.source, "data.source")
        for i, source in enumerate(self.val_sources):
            parse_source(source, f"data.val_sources[{i}]")
        if not parse_source(self.niah_haystack, "data.niah_haystack").is_text:
            raise ConfigError(
                f"data.niah_haystack={self.niah_haystack!r} must be a text source: 'embedded', 'hf:...' or local files"
            )

    def _check_recall(self) -> None:
        queries = self.recall_pairs if self.recall_queries is None else self.recall_queries
        if queries < 0:
            raise ConfigError(f"data.recall_queries={self.recall_queries!r} must be >= 0")
        if not 4 <= self.recall_vocab:
            raise ConfigError(f"data.recall_vocab={self.recall_vocab!r} must be >= 4")
        if not self.recall_pairs < self.recall_vocab // 2:
            raise ConfigError(f"data.recall_pairs={self.recall_pairs} must be < recall_vocab // 2 = {self.recall_vocab // 2}")
        uses_recall = "recall" in [self.source, *self.val_sources]
        if uses_recall and 2 * self.recall_pairs + 2 * queries > self.seq_len:
            raise ConfigError(
                f"data.seq_len={self.seq_len} is too short for recall_pairs={self.recall_pairs} and "
                f"{queries} queries: needs 2*pairs + 2*queries <= seq_len"
            )

    def _check_mqar(self) -> None:
        self.mqar_pairs = [int(n) for n in self.mqar_pairs] if isinstance(self.mqar_pairs, (list, tuple)) else None
        if not self.mqar_pairs or min(self.mqar_pairs) < 1:
            raise ConfigError("data.mqar_pairs must be a non-empty list of positive numbers of pairs, e.g. [8, 16, 32]")
        if not max(self.mqar_pairs) < self.mqar_vocab // 2:
            raise ConfigError(f"data.mqar_pairs={self.mqar_pairs} must stay below mqar_vocab // 2 = {self.mqar_vocab // 2}")
        if not 0 < self.mqar_power_a <= 1:
            raise ConfigError(f"data.mqar_power_a={self.mqar_power_a!r} must be in (0, 1]")
        if "mqar" in [self.source, *self.val_sources] and 4 * max(self.mqar_pairs) > self.seq_len:
            raise ConfigError(f"data.seq_len={self.seq_len} is too short for data.mqar_pairs={self.mqar_pairs}: "
                              f"needs >= 4 x pairs = {4 * max(self.mqar_pairs)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DataConfig":
        return from_mapping(cls, data, "data")


# --------------------------------------------------------------------------- reading documents


def load_documents(spec: SourceSpec, config: DataConfig, option: str = "data.source") -> list[str]:
    """The non-empty documents of a text source, at most ``config.max_documents``."""
    if spec.kind == "embedded":
        documents: Iterable = embedded_documents()
    else:
        dataset = _load_dataset(spec, config, option)
        field_name = "text" if spec.builder == "text" else config.text_field
        documents = _text_column(dataset, field_name, spec, option)
        if spec.builder == "text":  # paragraphs keep stray newlines at their ends
            documents = (doc.strip("\n") for doc in documents)
    documents = (doc for doc in documents if doc and doc.strip())
    return list(itertools.islice(documents, config.max_documents))


def _load_dataset(spec: SourceSpec, config: DataConfig, option: str):
    import datasets

    if spec.kind == "hf":
        args, kwargs = (spec.dataset, spec.config), {"split": spec.split}
    else:
        args, kwargs = (spec.builder,), {"data_files": list(spec.files), "split": "train"}
        if spec.builder == "text":
            kwargs["sample_by"] = "paragraph"
    quiet = logging.getLogger("datasets")  # a file's error is reported below, once, with its line or byte
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(*args, streaming=config.streaming, cache_dir=config.cache_dir, **kwargs)
    except Exception as err:  # datasets raises many types; re-raise one that names the option
        for path in spec.files:  # a local file's own problem (empty, binary, not UTF-8, bad JSON) first
            problem = file_problem(path, spec.builder)
            if problem:
                raise ConfigError(f"{option}={spec.text!r}: file {path} {problem}") from err
        raise ConfigError(
            f"{option}={spec.text!r} could not be loaded with datasets.load_dataset ({type(err).__name__}: {err}). "
            "There is no network at run time: use a local dataset directory, local files, or a dataset "
            f"already in the local cache; {SOURCE_FORMS}"
        ) from err
    finally:
        quiet.setLevel(level)


def file_problem(path: str, builder: str) -> Optional[str]:
    """What is wrong with a local data file, naming the line or byte (None if nothing is found)."""
    import json

    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not data.strip():
        return "is empty" if not data else "holds only whitespace"
    if builder == "parquet":
        try:
            import pyarrow.parquet as pq

            pq.read_metadata(path)
        except Exception as err:
            return f"is not a readable Parquet file ({' '.join(str(err).split())})"
        return None
    nul = data.find(b"\0")
    if nul >= 0:
        return f"is binary, not text (a NUL byte at byte offset {nul})"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        return (f"is not UTF-8 text: byte 0x{data[err.start]:02x} at byte offset {err.start} (line {line}) "
                "cannot be decoded (Latin-1 or another encoding? convert it to UTF-8)")
    if builder == "json" and Path(path).suffix.lower() == ".jsonl" or builder == "json" and "\n{" in text.strip():
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as err:
                    return f"line {number} is not valid JSON ({err})"
    elif builder == "json":
        try:
            json.loads(text)
        except ValueError as err:
            return f"is not valid JSON ({err})"
    return None


def _text_column(dataset, field_name: str, spec: SourceSpec, option: str) -> Iterable[str]:
    columns = dataset.column_names
    if columns is None:  # a stream with unknown features: look at its first row
        columns = list(next(iter(dataset), {}).keys())
    if field_name not in columns:
        raise ConfigError(
            f"data.text_field={field_name!r} is not a column of {option}={spec.text!r}; its columns are {columns}"
        )
    for row in dataset.select_columns([field_name]):
        text = row[field_name]
        if text is not None and not isinstance(text, str):
            raise ConfigError(f"data.text_field={field_name!r} of {option}={spec.text!r} holds {type(text).__name__}, not text")
        yield text


def split_documents(documents: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) documents: a seeded permutation, the first ``val_fraction`` held out."""
    order = np.random.default_rng(seed).permutation(len(documents))
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * len(documents)))
    if n_val >= len(documents):
        raise ConfigError(
            f"data.val_fraction={val_fraction} leaves no training documents out of {len(documents)}; "
            "add documents or set data.val_fraction=0"
        )
    return [documents[i] for i in order[n_val:]], [documents[i] for i in order[:n_val]]


# --------------------------------------------------------------------------- tokens and packing


def tokenize(documents: Sequence[str], tokenizer: Tokenizer) -> list[np.ndarray]:
    if isinstance(tokenizer, ByteTokenizer):  # fast path: the bytes are the ids
        return [np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(np.int32) for doc in documents]
    return [np.asarray(tokenizer.encode(doc), dtype=np.int32) for doc in documents]


def join_tokens(token_docs: Sequence[np.ndarray], separator: Sequence[int]) -> np.ndarray:
    """Documents one after the other, each followed by ``separator``."""
    separator = np.asarray(separator, dtype=np.int32)
    parts = [part for doc in token_docs for part in (doc, separator)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def pack(stream: np.ndarray, seq_len: int) -> torch.Tensor:
    """Cut a token stream into rows of ``seq_len + 1`` tokens (the remainder is dropped)."""
    n_rows = len(stream) // (seq_len + 1)
    return torch.from_numpy(np.ascontiguousarray(stream[: n_rows * (seq_len + 1)]).reshape(n_rows, seq_len + 1))


class PackedDataset(Dataset):
    """Rows of ``seq_len + 1`` tokens as ``{"input_ids": row[:-1], "labels": row[1:]}``."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index].long()
        return {"input_ids": row[:-1], "labels": row[1:]}


class GeneratedDataset(Dataset):
    """``size`` synthetic rows; row ``i`` is ``make_row(seed=hash_seed(seed, stream, i))``."""

    def __init__(self, size: int, make_row: Callable[..., dict], seed: int, stream: str):
        self.size, self.make_row, self.seed, self.stream = size, make_row, seed, stream

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.make_row(seed=hash_seed(self.seed, self.stream, index))
        return {name: torch.tensor(values, dtype=torch.float32 if name in FLOAT_FIELDS else torch.long)
                for name, values in row.items()}


def niah_row(haystack_ids: np.ndarray, tokenizer: Tokenizer, seq_len: int, n_needles: int, max_fraction: float,
             seed: int) -> dict:
    tokens = niah_training_sequence(haystack_ids, tokenizer, seq_len + 1, seed, n_needles, max_fraction=max_fraction)
    return {"input_ids": tokens[:-1], "labels": tokens[1:]}


def repeat_row(haystack_ids: np.ndarray, seq_len: int, min_span: int, seed: int) -> dict:
    tokens = repeated_span_sequence(haystack_ids, seq_len + 1, seed, min_span)
    return {"input_ids": tokens[:-1], "labels": tokens[1:]}


MAX_QUERY_PAIRS = 96  # (reader, source) positions a fact row gives the query loss; rows have at most ~70
FLOAT_FIELDS = ("loss_weights", "query_weight")


def fact_row(haystack_ids: np.ndarray, tokenizer: Tokenizer, seq_len: int, max_facts: int, same_words: float,
             shared: float, seed: int, answer_weight: float = 1.0, recalls: int = 1, query_weight: float = 0.0) -> dict:
    """A fact row; with ``answer_weight`` != 1 also its ``loss_weights``: that weight on the labels that are
    recall values' tokens, 1 elsewhere; with ``query_weight`` > 0 its "query_pairs": for each recalled value
    token, (the input position whose read predicts it, the input position whose read predicts the same token
    of the statement), -1 after the last pair, and "query_weight" [1], the query loss's weight for the row."""
    tokens, _, answers, sources = fact_sequence_with_sources(haystack_ids, tokenizer, seq_len + 1, seed, max_facts,
                                                             same_words, shared=shared, recalls=recalls)
    row = {"input_ids": tokens[:-1], "labels": tokens[1:]}
    if answer_weight != 1.0:
        weights = np.ones(seq_len, dtype=np.float32)
        for start, stop in answers:
            weights[max(0, start - 1):stop - 1] = answer_weight  # label i is token i + 1
        row["loss_weights"] = weights
    if query_weight > 0:
        pairs = [(a + i - 1, s + i - 1) for (a, b), (s, _) in zip(answers, sources) for i in range(b - a) if s + i >= 1]
        row["query_pairs"] = _padded_pairs(pairs[:MAX_QUERY_PAIRS])
        row["query_weight"] = np.array([query_weight], dtype=np.float32)
    return row


def _padded_pairs(pairs: list) -> np.ndarray:
    out = np.full((MAX_QUERY_PAIRS, 2), -1, dtype=np.int64)
    if pairs:
        out[:len(pairs)] = pairs
    return out


# what a row without them gets, when other rows of its batch carry these fields
ROW_DEFAULTS = {
    "loss_weights": lambda item: torch.ones(item["labels"].shape, dtype=torch.float32),  # weight 1 on every label
    "query_pairs": lambda item: torch.from_numpy(_padded_pairs([])),  # no pairs
    "query_weight": lambda item: torch.zeros(1),
}


def collate_weighted(items: list[dict]) -> dict:
    """Default collation; a field of :data:`ROW_DEFAULTS` that some rows carry is given to the others."""
    for name, default in ROW_DEFAULTS.items():
        if any(name in item for item in items):
            items = [item if name in item else item | {name: default(item)} for item in items]
    return default_collate(items)


# --------------------------------------------------------------------------- resumable order


class ResumableSampler(Sampler[int]):
    """Train order that continues from the data position: (epoch, batches consumed).

    Epoch ``e`` is a permutation of ``range(size)`` drawn from (seed, e); a pass over the
    sampler yields that epoch's indices from the first unconsumed batch on. The owner calls
    :meth:`record_batch` for every batch that was really used. With ``world_size`` ranks a batch
    is a global batch of ``world_size x batch_size`` rows of which this ``rank`` yields its part.
    ``len()`` stays the full size (one rank's share of it) so that Lightning's batch counting
    after a mid-epoch restart stays right.
    """

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.batches_consumed = 0  # global batches, in the current epoch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.global_batch  # the last partial batch is dropped

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning each epoch; ignored, the order follows the data position."""

    def record_batch(self) -> None:
        self.batches_consumed += 1
        if self.batches_consumed >= self.batches_per_epoch:
            self.epoch, self.batches_consumed = self.epoch + 1, 0

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self):
        order = self.order(self.epoch)
        if self.world_size == 1:
            return iter(order[self.batches_consumed * self.batch_size:].tolist())
        n = self.batches_per_epoch
        parts = order[:n * self.global_batch].reshape(n, self.world_size, self.batch_size)
        return iter(parts[self.batches_consumed:, self.rank].reshape(-1).tolist())

    def __len__(self) -> int:
        return self.size if self.world_size == 1 else self.batches_per_epoch * self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])


class ResumableDataLoader(DataLoader):
    """A train loader over a :class:`ResumableSampler` that exposes the sampler position.

    Lightning saves and restores a loader with ``state_dict``/``load_state_dict`` itself
    (the same position the DataModule stores) and then knows it resumes exactly.
    """

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


# --------------------------------------------------------------------------- the DataModule


class FwPKMDataModule(L.LightningDataModule):
    """Train/validation loaders for a :class:`DataConfig`; batches are dicts of LongTensors
    ``{"input_ids": [B, T], "labels": [B, T]}``.

    ``tokenizer`` and ``vocab_size`` exist right after construction. ``val_names`` labels
    the validation loaders (main split first); with ``val_sources`` the validation loaders
    come as a list, otherwise as one loader.
    """

    def __init__(self, config: DataConfig | dict | None = None, **overrides: Any):
        super().__init__()
        if config is None:
            config = DataConfig(**overrides)
        elif isinstance(config, dict):
            config = DataConfig.from_dict({**config, **overrides})
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer, "data.tokenizer")
        self.vocab_size = self.tokenizer.vocab_size
        for task, vocab in (("recall", config.recall_vocab), ("mqar", config.mqar_vocab)):
            if task in [config.source, *config.val_sources] and vocab > self.vocab_size:
                raise ConfigError(f"data.{task}_vocab={vocab} exceeds the vocab_size={self.vocab_size} of "
                                  f"data.tokenizer={config.tokenizer!r}" + ("; use ids:<N>" if task == "mqar" else ""))
        self.main_source = parse_source(config.source, "data.source")
        self.val_specs = [(f"data.val_sources[{i}]", parse_source(s, f"data.val_sources[{i}]")) for i, s in enumerate(config.val_sources)]
        self.val_names = self._val_names()
        self.train_set: Optional[Dataset] = None
        self.val_sets: list[Dataset] = []
        self.sampler: Optional[ResumableSampler] = None
        self._documents: dict[str, list[str]] = {}
        self._resume_state: Optional[dict] = None

    def _val_names(self) -> list[str]:
        labels = ([self.main_source.label] if self.config.val_fraction > 0 else []) + [s.label for _, s in self.val_specs]
        names = []
        for label in labels:
            names.append(label if label not in names else f"{label}_{len(names)}")
        return names

    # ----------------------------------------------------------------- building the sets

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        train_set = self._train_set(self.main_source)
        if len(train_set) < self.config.batch_size:
            raise ConfigError(
                f"data.source={self.config.source!r} gives {len(train_set)} training rows of "
                f"seq_len+1={self.config.seq_len + 1} tokens, fewer than data.batch_size={self.config.batch_size}"
            )
        main_val = [self._held_out_set(self.main_source, "data.source")] if self.config.val_fraction > 0 else []
        self.val_sets = main_val + [self._extra_val_set(spec, option) for option, spec in self.val_specs]
        self.train_set = train_set
        rank, world = self._rank_and_world()
        self.sampler = ResumableSampler(len(train_set), self.config.batch_size, self.config.seed, rank=rank,
                                        world_size=world)
        if self._resume_state is not None:
            self._apply_resume_state()

    shards_by_rank = True  # each rank reads its own part of every global batch

    def _shard_for_this_rank(self) -> None:
        """Set up before the Trainer attached (one process), the sampler is rebuilt for this rank,
        at the same row of the epoch."""
        rank, world = self._rank_and_world()
        if (self.sampler.rank, self.sampler.world_size) != (rank, world):
            self._resume_state = self._resume_state or self.state_dict()
            self.sampler = ResumableSampler(len(self.train_set), self.config.batch_size, self.config.seed,
                                            rank=rank, world_size=world)
            self._apply_resume_state()

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    @property
    def global_batch_size(self) -> int:
        """Rows per optimizer step over all ranks: world size x data.batch_size."""
        return self.config.batch_size * self._rank_and_world()[1]

    def documents(self, source: str) -> list[str]:
        """The documents of a text source as this module reads them (cached)."""
        return self._documents_of(parse_source(source), "source")

    def _documents_of(self, spec: SourceSpec, option: str) -> list[str]:
        if spec.text not in self._documents:
            documents = load_documents(spec, self.config, option)
            if not documents:
                raise ConfigError(f"{option}={spec.text!r} contains no non-empty documents")
            self._documents[spec.text] = documents
        return self._documents[spec.text]

    def _text_split(self, spec: SourceSpec, option: str) -> tuple[list[str], list[str]]:
        return split_documents(self._documents_of(spec, option), self.config.val_fraction, self.config.seed)

    def _packed(self, documents: Sequence[str], option: str, spec: SourceSpec) -> PackedDataset:
        stream = join_tokens(tokenize(documents, self.tokenizer), [self.tokenizer.eos_id])
        rows = pack(stream, self.config.seq_len)
        if len(rows) == 0:
            raise ConfigError(
                f"{option}={spec.text!r} gives {len(stream)} tokens here, less than one row of "
                f"seq_len+1={self.config.seq_len + 1}; lower data.seq_len or add text (or raise data.val_fraction)"
            )
        return PackedDataset(rows)

    def _haystack(self, documents: Sequence[str]) -> np.ndarray:
        return join_tokens(tokenize(documents, self.tokenizer), self.tokenizer.encode(HAYSTACK_SEPARATOR))

    def _synthetic_set(self, kind: str, size: int, stream: str, haystack: Optional[np.ndarray] = None) -> GeneratedDataset:
        """Generated rows of ``kind`` (recall, mqar, niah, repeat or facts); the last three draw on ``haystack``
        (the token ids of :meth:`_haystack`)."""
        cfg = self.config
        if kind == "recall":
            make_row = functools.partial(associative_recall_sequence, cfg.seq_len, cfg.recall_pairs, cfg.recall_queries, cfg.recall_vocab)
        elif kind == "mqar":
            make_row = functools.partial(mqar_sequence, cfg.seq_len, cfg.mqar_pairs, cfg.mqar_vocab, cfg.mqar_power_a)
        elif kind == "repeat":
            make_row = functools.partial(repeat_row, haystack, cfg.seq_len, cfg.repeat_min_span)
        elif kind == "facts":
            make_row = functools.partial(fact_row, haystack, self.tokenizer, cfg.seq_len, cfg.facts_per_row,
                                         cfg.facts_same_words, cfg.facts_shared,
                                         answer_weight=cfg.facts_answer_weight if stream == "train-facts" else 1.0,
                                         recalls=cfg.facts_recalls,
                                         query_weight=cfg.facts_query_weight if stream == "train-facts" else 0.0)
        else:
            make_row = functools.partial(niah_row, haystack, self.tokenizer, cfg.seq_len, cfg.niah_needles,
                                         cfg.niah_max_fraction)
        dataset = GeneratedDataset(size, make_row, cfg.seed, stream)
        try:
            dataset[0]  # fail now, not in the middle of training, if rows cannot be made
        except ValueError as err:
            raise ConfigError(f"data.seq_len={cfg.seq_len} does not suit the {kind!r} rows: {err}") from err
        return dataset

    def _niah_haystack_split(self) -> tuple[list[str], list[str]]:
        spec = parse_source(self.config.niah_haystack, "data.niah_haystack")
        documents = self._documents_of(spec, "data.niah_haystack")
        if self.config.val_fraction == 0:
            return documents, documents
        return self._text_split(spec, "data.niah_haystack")

    def _train_set(self, spec: SourceSpec) -> Dataset:
        cfg = self.config
        if spec.kind in ("recall", "mqar"):
            return self._synthetic_set(spec.kind, cfg.synthetic_train_size, "train")
        if spec.kind == "niah":
            return self._synthetic_set("niah", cfg.synthetic_train_size, "train", self._haystack(self._niah_haystack_split()[0]))
        train_docs, _ = self._text_split(spec, "data.source")
        packed = self._packed(train_docs, "data.source", spec)
        total = len(packed) / (1 - cfg.niah_fraction - cfg.repeat_fraction - cfg.facts_fraction)  # rows of all kinds
        counts = {kind: round(total * fraction) for kind, fraction in
                  (("niah", cfg.niah_fraction), ("repeat", cfg.repeat_fraction), ("facts", cfg.facts_fraction))}
        parts = [packed]
        haystack = self._haystack(train_docs) if any(counts.values()) else None  # tokenised once for all kinds
        for kind, stream in (("niah", "train"), ("repeat", "train-repeat"), ("facts", "train-facts")):
            if counts[kind]:
                parts.append(self._synthetic_set(kind, counts[kind], stream, haystack))
        return packed if len(parts) == 1 else ConcatDataset(parts)

    def _held_out_set(self, spec: SourceSpec, option: str) -> Dataset:
        cfg = self.config
        if spec.kind in ("recall", "mqar"):
            return self._synthetic_set(spec.kind, cfg.synthetic_val_size, "val")
        if spec.kind == "niah":
            return self._synthetic_set("niah", cfg.synthetic_val_size, "val", self._haystack(self._niah_haystack_split()[1]))
        if cfg.val_fraction == 0:
            raise ConfigError(f"{option}={spec.text!r} needs held-out documents but data.val_fraction=0")
        return self._packed(self._text_split(spec, option)[1], option, spec)

    def _extra_val_set(self, spec: SourceSpec, option: str) -> Dataset:
        """A val source: file and hf sources whole, the others their held-out part."""
        if spec.kind in ("hf", "files"):
            return self._packed(self._documents_of(spec, option), option, spec)
        return self._held_out_set(spec, option)

    # ----------------------------------------------------------------- loaders

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        self._shard_for_this_rank()
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.config.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=self.config.num_workers,
            collate_fn=collate_weighted,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        self.setup("validate")
        loaders = [
            DataLoader(dataset, batch_size=self.config.batch_size, shuffle=False, num_workers=self.config.num_workers)
            for dataset in self.val_sets
        ]
        return loaders if self.config.val_sources else (loaders[0] if loaders else [])

    @property
    def batches_per_epoch(self) -> Optional[int]:
        """Optimizer steps per pass over the train rows (global batches)."""
        return None if self.sampler is None else self.sampler.batches_per_epoch

    # ----------------------------------------------------------------- resuming

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self.record_train_batch()
        return batch

    def record_train_batch(self) -> None:
        """Count one consumed training batch (the Trainer does this through the hook above;
        call it yourself when iterating the train loader without a Trainer)."""
        self.sampler.record_batch()

    def state_dict(self) -> dict[str, Any]:
        if self.sampler is None:  # not set up: still at the start, or at a loaded position
            return dict(self._resume_state or {"epoch": 0, "batches_consumed": 0})
        return {
            **self.sampler.state_dict(),
            "seed": self.config.seed,
            "batch_size": self.config.batch_size,
            "train_rows": len(self.train_set),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_state = dict(state_dict)
        if self.sampler is not None:
            self._apply_resume_state()

    def _apply_resume_state(self) -> None:
        state, self._resume_state = self._resume_state, None
        if "train_rows" in state:
            saved = (state["seed"], state["train_rows"])
            current = (self.config.seed, len(self.train_set))
            if saved != current:
                raise ConfigError(
                    "the checkpoint's data position was saved for (seed, train rows) = "
                    f"{saved}, but this run has {current}; resume with the same data settings"
                )
            state = self._convert_position(state)
        self.sampler.load_state_dict(state)

    def _convert_position(self, state: dict) -> dict:
        """The saved position in global batches of this run's size (another device count or batch size)."""
        saved_world = int(state.get("world_size", 1))
        saved_global, current_global = int(state["batch_size"]) * saved_world, self.sampler.global_batch
        if saved_global == current_global:
            return state
        rows = int(state["batches_consumed"]) * saved_global
        if rows % current_global:
            raise ConfigError(
                f"the checkpoint stopped {rows} rows into epoch {state['epoch']} with a global batch of {saved_global} "
                f"({saved_world} device(s) x data.batch_size={state['batch_size']}); this run's global batch of "
                f"{current_global} ({self.sampler.world_size} x {self.config.batch_size}) does not divide {rows}, so "
                f"it cannot continue at that row: resume with a global batch that divides {rows} (e.g. {saved_global})")
        return {**state, "batches_consumed": rows // current_global}
