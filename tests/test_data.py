"""Data side: tokenizer, synthetic tasks, sources, packing, and exact resuming. Offline."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import itertools
import json
import re
import warnings
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch

from lit.data import DataConfig, FwPKMDataModule, embedded_documents, embedded_text, join_tokens, pack
from lit.synthetic import (
    IGNORE_INDEX,
    associative_recall_batch,
    make_niah_sample,
    needle_text,
    niah_training_sequence,
    repeated_span_sequence,
    score_answer,
)
from lit.tokenizer import ByteTokenizer, load_tokenizer

TOK = ByteTokenizer()
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def haystack_ids():
    return TOK.encode(embedded_text()[:200_000])


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "other": 1}) + "\n" for t in texts))
    return path


def documents(n=60, words=40):
    return [" ".join(f"doc{d}word{w}" for w in range(words)) + "." for d in range(n)]


def module(tmp_path, **overrides):
    overrides.setdefault("cache_dir", str(tmp_path / "hf_cache"))
    return FwPKMDataModule(**overrides)


# --------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trip():
    text = "Hello, world! Grüße, 東京 ✓\n"
    ids = TOK.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert TOK.decode(ids) == text
    assert TOK.decode(ids + [TOK.eos_id, TOK.pad_id]) == text  # specials are skipped
    assert TOK.vocab_size % 8 == 0 and TOK.vocab_size > max(TOK.eos_id, TOK.pad_id)
    assert TOK.decode([0xFF]) == "\ufffd"
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_bad_tokenizer_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer='no-such/tokenizer'.*'byte'"):
        load_tokenizer("no-such/tokenizer")
    with pytest.raises(ValueError, match="data.tokenizer='no-such/tokenizer'.*only 'byte'"):
        module(tmp_path, tokenizer="no-such/tokenizer")


def test_embedded_corpus_is_sizeable_text():
    text = embedded_text()
    assert 300_000 < len(text) < 3_000_000 and text.isascii()
    assert len(embedded_documents()) > 100


# --------------------------------------------------------------------------- needle in a haystack


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_niah_needles_sit_at_their_depths(haystack_ids, seed):
    depths = [0.05, 0.3, 0.5, 0.7, 0.95]
    context_len = 3000
    sample = make_niah_sample(haystack_ids, TOK, depths=depths, seed=seed, context_len=context_len, haystack_start=None)
    assert len(sample.context_ids) + len(sample.question_ids) == context_len
    assert len(set(sample.keys)) == 5 and all(re.fullmatch(r"ID-[0-9A-F]{4}", k) for k in sample.keys)
    assert all(re.fullmatch(r"\d{6}", v) for v in sample.values)
    for key, value, pos, wanted, actual in zip(sample.keys, sample.values, sample.needle_positions, depths, sample.depths):
        needle = TOK.encode(needle_text(key, value))
        assert sample.context_ids[pos : pos + len(needle)] == needle
        assert abs(pos / context_len - wanted) < 0.05 and abs(actual - wanted) < 0.03
    text = TOK.decode(sample.context_ids)
    assert text.count("The secret number for") == 5


def test_niah_question_and_answer_agree(haystack_ids):
    for seed in range(5):
        sample = make_niah_sample(haystack_ids, TOK, seed=seed, context_len=1024)
        key, value = sample.keys[sample.target_index], sample.values[sample.target_index]
        assert TOK.decode(sample.question_ids) == f"The secret number for {key} is "
        assert sample.answer == value and TOK.decode(sample.answer_ids) == value
        assert all(0 <= d <= 1 for d in sample.depths)
        assert sample.input_ids == sample.context_ids + sample.question_ids
    chosen = make_niah_sample("short haystack. ", TOK, n_needles=3, seed=0, context_len=400, target_index=2)
    assert chosen.answer == chosen.values[2] and len(chosen.input_ids) == 400  # short haystacks wrap around
    again = make_niah_sample("short haystack. ", TOK, n_needles=3, seed=0, context_len=400, target_index=2)
    assert again == chosen
    with pytest.raises(ValueError, match="context_len"):
        make_niah_sample(haystack_ids, TOK, seed=0, context_len=100)


def test_score_answer():
    assert score_answer("123456", "123456") == (True, 1.0)
    assert score_answer("  123456. The secret", "123456") == (True, 1.0)  # extra tokens ignored
    assert score_answer("123956", "123456") == (False, 5 / 6)
    assert score_answer("12", "123456") == (False, 2 / 6)  # short answer
    assert score_answer("", "123456") == (False, 0.0)
    assert score_answer("654321", "123456") == (False, 0.0)


def test_niah_training_sequences(haystack_ids):
    sequence = niah_training_sequence(haystack_ids, TOK, 1024, seed=3)
    assert len(sequence) == 1024
    text = TOK.decode(sequence)
    needles = re.findall(r" The secret number for (ID-[0-9A-F]{4}) is (\d{6})\.", text)
    answers = re.findall(r"\nThe secret number for (ID-[0-9A-F]{4}) is (\d{6})\.", text)
    assert len(answers) == 5 and sorted(answers) == sorted(needles[: len(answers)])
    assert text.endswith(".")
    assert niah_training_sequence(haystack_ids, TOK, 1024, seed=3) == sequence
    assert len(niah_training_sequence(haystack_ids, TOK, 257, seed=3)) == 257  # fewer needles fit


def test_repeated_span_sequences(haystack_ids):
    text = TOK.decode(haystack_ids)
    for seed in range(20):
        sequence = repeated_span_sequence(haystack_ids, 257, seed=seed, min_span=64)
        assert len(sequence) == 257 and repeated_span_sequence(haystack_ids, 257, seed=seed, min_span=64) == sequence
        # some span of >= 64 tokens occurs twice: find it from its first 64 tokens
        first = sequence[:64]
        later = [i for i in range(1, 257 - 63) if sequence[i:i + 64] == first]
        assert later, f"seed {seed}: the first span does not come back"
        assert TOK.decode(sequence[:64]) in text  # the span is haystack text
    assert repeated_span_sequence(haystack_ids, 257, seed=0) != repeated_span_sequence(haystack_ids, 257, seed=1)
    with pytest.raises(ValueError, match="too short for two spans"):
        repeated_span_sequence(haystack_ids, 100, seed=0, min_span=64)


def test_associative_recall():
    batch = associative_recall_batch(4, seq_len=64, n_pairs=8, seed=0)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 64)
    for inputs, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        pairs = dict(zip(inputs[0:16:2], inputs[1:16:2]))
        answered = [(inputs[t], labels[t]) for t in range(64) if labels[t] != IGNORE_INDEX]
        assert len(answered) == 8 and all(pairs[k] == v for k, v in answered)
    assert torch.equal(associative_recall_batch(4, 64, 8, seed=0)["input_ids"], batch["input_ids"])


# --------------------------------------------------------------------------- packing and sources


def test_pack_puts_eos_between_documents():
    stream = join_tokens([torch.tensor([1, 2]).numpy(), torch.tensor([3, 4, 5]).numpy()], [TOK.eos_id])
    rows = pack(stream, seq_len=2)
    assert rows.tolist() == [[1, 2, TOK.eos_id], [3, 4, 5]]


def test_batches_are_shifted_and_documents_separated(tmp_path):
    texts = documents()
    dm = module(tmp_path, source=str(write_jsonl(tmp_path / "d.jsonl", texts)), seq_len=64, batch_size=4, val_fraction=0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 64)
    assert batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    stream = dm.train_set.rows.reshape(-1).tolist()  # the rows in dataset order are the packed stream
    pieces = _split_on(stream, TOK.eos_id)
    whole_documents = pieces[1:-1]  # the first and last piece may be cut
    assert len(whole_documents) > 10
    assert all(TOK.decode(piece) in texts for piece in whole_documents)


def _split_on(ids, separator):
    pieces, current = [], []
    for token in ids:
        if token == separator:
            pieces.append(current)
            current = []
        else:
            current.append(token)
    return pieces + [current]


@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet", "directory", "glob"])
def test_local_files_load(tmp_path, kind):
    texts = documents(40)
    folder = tmp_path / "files"
    folder.mkdir()
    if kind == "txt":
        (folder / "a.txt").write_text("\n\n".join(texts) + "\n")
        source = str(folder / "a.txt")
    elif kind == "parquet":
        pd.DataFrame({"text": texts}).to_parquet(folder / "a.parquet")
        source = str(folder / "a.parquet")
    else:
        write_jsonl(folder / "a.jsonl", texts[:20])
        write_jsonl(folder / "b.jsonl", texts[20:])
        source = {"jsonl": str(folder / "a.jsonl"), "directory": str(folder), "glob": str(folder / "*.jsonl")}[kind]
    dm = module(tmp_path, source=source, seq_len=32, batch_size=2)
    dm.setup()
    expected = texts[:20] if kind == "jsonl" else texts
    assert sorted(dm.documents(source)) == sorted(expected)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 32)
    assert next(iter(dm.val_dataloader()))["input_ids"].shape[1] == 32


def test_hf_source_on_a_local_dataset_directory(tmp_path):
    texts = documents(30)
    dataset_dir = tmp_path / "my_dataset"
    dataset_dir.mkdir()
    pd.DataFrame({"content": texts}).to_parquet(dataset_dir / "train.parquet")
    for streaming in (False, True):
        dm = module(tmp_path, source=f"hf:{dataset_dir}@train", text_field="content", seq_len=32, batch_size=2,
                    streaming=streaming, max_documents=25, val_sources=[f"hf:{dataset_dir}"])
        dm.setup()
        assert dm.documents(dm.config.source) == texts[:25]
        assert next(iter(dm.train_dataloader()))["input_ids"].shape == (2, 32)
        val_loaders = dm.val_dataloader()
        assert isinstance(val_loaders, list) and len(val_loaders) == 2 == len(dm.val_names)
        assert dm.val_names[0] != dm.val_names[1]


def test_synthetic_sources(tmp_path):
    dm = module(tmp_path, source="niah", seq_len=256, batch_size=2, synthetic_train_size=8, synthetic_val_size=4,
                val_sources=["recall", "embedded"])
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 256)
    assert "The secret number for" in TOK.decode(batch["input_ids"][0].tolist())
    assert dm.val_names == ["niah", "recall", "embedded"]
    assert [len(loader.dataset) for loader in dm.val_dataloader()][:2] == [4, 4]

    mixed = module(tmp_path, source="embedded", seq_len=256, batch_size=2, niah_fraction=0.25)
    mixed.setup()
    n_niah = len(mixed.train_set.datasets[1])
    assert abs(n_niah / len(mixed.train_set) - 0.25) < 0.01

    mixed = module(tmp_path, source="embedded", seq_len=256, batch_size=2, niah_fraction=0.25, repeat_fraction=0.5)
    mixed.setup()
    text, niah, repeat = mixed.train_set.datasets
    assert abs(len(niah) / len(mixed.train_set) - 0.25) < 0.01 and abs(len(repeat) / len(mixed.train_set) - 0.5) < 0.01
    row = repeat[3]["input_ids"].tolist()
    assert any(row[i:i + 64] == row[:64] for i in range(1, 256 - 63))


# --------------------------------------------------------------------------- order and resuming


def batch_stream(dm, n):
    """The first ``n`` training batches, passing over the loader as often as needed."""
    dm.setup()
    batches = []
    while len(batches) < n:
        for batch in itertools.islice(dm.train_dataloader(), n - len(batches)):
            dm.record_train_batch()
            batches.append(batch["input_ids"])
    return batches


def test_order_is_deterministic_given_the_seed(tmp_path):
    a = batch_stream(module(tmp_path, seq_len=64, batch_size=4, seed=7), 3)
    b = batch_stream(module(tmp_path, seq_len=64, batch_size=4, seed=7), 3)
    c = batch_stream(module(tmp_path, seq_len=64, batch_size=4, seed=8), 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_state_dict_resumes_at_the_next_batch_without_a_trainer(tmp_path):
    settings = dict(seq_len=128, batch_size=16, seed=3)
    reference = module(tmp_path, **settings)
    reference.setup()
    per_epoch = reference.batches_per_epoch
    order = batch_stream(reference, 2 * per_epoch + 1)
    assert not torch.equal(order[0], order[per_epoch])  # epochs are shuffled differently

    for consumed in (5, per_epoch - 1, per_epoch, per_epoch + 3, 2 * per_epoch):
        dm = module(tmp_path, **settings)
        batch_stream(dm, consumed)
        state = dm.state_dict()
        assert (state["epoch"], state["batches_consumed"]) == divmod(consumed, per_epoch)

        resumed = module(tmp_path, **settings)
        resumed.load_state_dict(state)  # before setup, as Lightning does
        resumed.setup()
        assert torch.equal(next(iter(resumed.train_dataloader()))["input_ids"], order[consumed])

    changed = module(tmp_path, seq_len=128, batch_size=16, seed=4)
    changed.setup()
    with pytest.raises(ValueError, match="same data settings"):
        changed.load_state_dict(state)

    dm = module(tmp_path, **settings)
    batch_stream(dm, 5)  # 80 rows into the epoch
    halved = module(tmp_path, seq_len=128, batch_size=8, seed=3)
    halved.load_state_dict(dm.state_dict())
    halved.setup()  # another global batch that starts at row 80: continues there
    assert torch.equal(next(iter(halved.train_dataloader()))["input_ids"], order[5][:8])
    assert halved.state_dict()["batches_consumed"] == 10
    bigger = module(tmp_path, seq_len=128, batch_size=48, seed=3)
    bigger.setup()
    with pytest.raises(ValueError, match="does not divide 80"):
        bigger.load_state_dict(dm.state_dict())


def test_ranks_read_disjoint_parts_of_the_one_process_global_batch():
    from lit.data import ResumableSampler

    one = ResumableSampler(50, 6, seed=1)  # one process, the global batch of 2 ranks x 3
    ranks = [ResumableSampler(50, 3, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == 24 and ranks[0].batches_per_epoch == one.batches_per_epoch == 8
    for _ in range(2):  # an epoch boundary on the way
        for step in range(6):
            streams = [list(r)[:3] for r in ranks]
            assert not set(streams[0]) & set(streams[1])
            assert streams[0] + streams[1] == list(one)[:6], step
            for sampler in (one, *ranks):
                sampler.record_batch()
    assert ranks[0].state_dict() == {"epoch": 1, "batches_consumed": 4, "world_size": 2}
    with pytest.raises(ValueError, match="rank 2 outside"):
        ResumableSampler(50, 3, seed=1, rank=2, world_size=2)


class RecordingModel(L.LightningModule):
    def __init__(self, vocab_size):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, 4)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return self.embedding(batch["input_ids"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.embedding(batch["input_ids"]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, max_steps, ckpt_path=None, callbacks=()):
    dm = module(tmp_path, source="recall", seq_len=64, batch_size=32, seed=1, synthetic_train_size=288)
    model = RecordingModel(dm.vocab_size)
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=2, val_check_interval=4, default_root_dir=tmp_path,  # validation must not move the train position
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model, dm


def test_trainer_resume_sees_exactly_the_uninterrupted_batches(tmp_path):
    every_5_steps = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "mid", every_n_train_steps=5, save_top_k=-1, filename="{step}"
    )
    _, full, dm = fit(tmp_path, max_steps=24, callbacks=[every_5_steps])
    assert dm.batches_per_epoch == 9  # the run crosses two epoch boundaries
    checkpoints = {int(p.stem.split("=")[1]): p for p in (tmp_path / "mid").glob("*.ckpt")}
    assert sorted(checkpoints) == [5, 10, 15, 20]

    for stop in (3, 9, 11):  # a run stopped by max_steps, continued later
        trainer, first, _ = fit(tmp_path, max_steps=stop)
        trainer.save_checkpoint(tmp_path / f"stop{stop}.ckpt")
        checkpoints[stop] = tmp_path / f"stop{stop}.ckpt"
        assert all(torch.equal(a, b) for a, b in zip(first.seen, full.seen[:stop]))

    for step, path in sorted(checkpoints.items()):  # mid-run checkpoints and stopped runs
        _, resumed, _ = fit(tmp_path, max_steps=24, ckpt_path=path)
        assert len(resumed.seen) == 24 - step
        assert all(torch.equal(a, b) for a, b in zip(resumed.seen, full.seen[step:])), f"resumed at step {step}"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "source, message",
    [
        ("s3://bucket/data.jsonl", "unknown scheme"),
        ("foo:bar", "unknown scheme"),
        ("embeded", "neither a known source"),
        ("missing/file.jsonl", "does not exist"),
        ("hf:", "names no dataset"),
    ],
)
def test_bad_sources_are_clear_errors(source, message):
    with pytest.raises(ValueError, match=message) as error:
        DataConfig(source=source)
    assert "data.source" in str(error.value) and "allowed forms" in str(error.value)


def test_other_config_errors(tmp_path):
    with pytest.raises(ValueError, match="data.val_sources\\[0\\]"):
        DataConfig(val_sources=["nope.parquet"])
    with pytest.raises(ValueError, match="data.val_fraction"):
        DataConfig(val_fraction=1.5)
    with pytest.raises(ValueError, match="data.seq_len"):
        DataConfig(seq_len=0)
    with pytest.raises(ValueError, match="unknown option"):
        DataConfig.from_dict({"sauce": "embedded"})
    with pytest.raises(ValueError, match="data.repeat_fraction"):
        DataConfig(repeat_fraction=-0.1)
    with pytest.raises(ValueError, match=r"niah_fraction \+ data.repeat_fraction"):
        DataConfig(niah_fraction=0.5, repeat_fraction=0.5)
    with pytest.raises(ValueError, match="data.repeat_min_span=200 is too long for data.seq_len=256"):
        DataConfig(repeat_fraction=0.5, repeat_min_span=200)
    assert DataConfig.from_dict(DataConfig(val_sources=["niah"]).to_dict()) == DataConfig(val_sources=["niah"])


def test_missing_text_field_and_unloadable_hf_dataset(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", documents(10), field="body")
    dm = module(tmp_path, source=str(path))
    with pytest.raises(ValueError, match=r"text_field='text'.*columns are \['body', 'other'\]"):
        dm.setup()
    dm = module(tmp_path, source="hf:surely-not-a-local/dataset")
    with pytest.raises(ValueError, match="data.source='hf:surely-not-a-local/dataset'.*network"):
        dm.setup()


# --------------------------------------------------------------------------- needle families and fact rows


def test_patterns_make_what_they_say_and_bad_ones_are_named():
    import random

    from lit.needles import parse_pattern

    rng = random.Random(0)
    for text, example in [("ID-[0-9A-F]{4}", "ID-3F9A"), ("(Dr.|Ms.) (Okafor|Novak)", "Ms. Novak"),
                          ("[a-z]{2,4}\\[[0-9]\\]", "ab[7]"), ("x[ab]{0,2}", "x")]:
        pattern = parse_pattern(text)
        assert re.fullmatch(pattern.regex, example)
        draws = {pattern.draw(rng) for _ in range(300)}
        assert all(re.fullmatch(pattern.regex, d) for d in draws) and len(draws) > 2
    assert parse_pattern("[0-9]{6}").size == 10**6 and parse_pattern("(a|b)[xy]{1,2}").size == 2 * (2 + 4)
    for bad, message in [("[a-z", "never closed"), ("(a|b", "never closed"), ("a{x}", "{n} or {m,n}"), ("[z-a]", "backwards"),
                         ("|a", "nothing to apply to"), ("", "empty")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_pattern(bad)


def test_shipped_families_load_and_the_spec_family_is_the_spec(tmp_path):
    from lit.needles import NeedleFamily, load_families, resolve_families, shipped_families
    from lit.synthetic import SPEC_FAMILY

    families = shipped_families()
    assert families["spec"].same_needles(SPEC_FAMILY) and len(families) >= 5
    assert len({f.question for f in families.values()}) == len(families)  # every family asks its own way
    assert [f.name for f in resolve_families(None)] == ["spec"]
    assert [f.name for f in resolve_families(["all"])] == list(families)
    mine = tmp_path / "mine.yaml"
    mine.write_text("- {name: mine, needle: ' Box {key} holds {value}.', question: 'Box {key} holds ', key: 'B[0-9]{3}', "
                    "value: '[a-z]{4}'}\n")
    assert [f.name for f in resolve_families(["vault", str(mine)])] == ["vault", "mine"]
    assert load_families(mine)["mine"].needle_text("B123", "abcd") == " Box B123 holds abcd."
    for bad, message in [(dict(needle=" {key} only."), "must hold {value} once"),
                         (dict(question="{key} {value}"), "must not hold the answer"),
                         (dict(needle="No space {key} {value}."), "must start with a space"),
                         (dict(key="[ab]"), "fewer than 16 keys"), (dict(value="[0-9"), "value: pattern")]:
        fields = dict(name="x", needle=" The {key} is {value}.", question="The {key} is ", key="K[0-9]{3}", value="[0-9]{4}")
        with pytest.raises(ValueError, match=re.escape(message)):
            NeedleFamily(**(fields | bad))
    with pytest.raises(ValueError, match="choose a shipped family"):
        resolve_families(["nope"])
    (tmp_path / "twice.yaml").write_text(mine.read_text() * 2)
    with pytest.raises(ValueError, match="twice"):
        load_families(tmp_path / "twice.yaml")


def test_fact_rows_recall_their_facts_and_never_hold_an_evaluation_template():
    """The training mixture of the recall grid (text, repeated spans, fact rows) against every shipped needle
    family: none of their sentences, questions or the spec's key format appears in a training row; and a
    fact row states each fact and recalls it later (its value occurs at least twice), rows are a function
    of the seed."""
    import yaml

    from lit.facts import fact_sequence
    from lit.needles import parse_pattern, shipped_families

    data = yaml.safe_load((ROOT / "ablations" / "grids" / "recall.yaml").read_text())["base"]["data"]
    assert data["niah_fraction"] == 0 and data["facts_fraction"] > 0
    dm = FwPKMDataModule(**{k: v for k, v in data.items() if k in DataConfig.__dataclass_fields__} | {"seed": 3})
    dm.setup()
    facts = dm.train_set.datasets[-1]
    phrases = sorted({p for f in shipped_families().values() for p in f.fixed_phrases()})
    assert "The secret number for" in phrases and "passcode of vault" in " ".join(phrases)
    spec_key = re.compile(parse_pattern("ID-[0-9A-F]{4}").regex)
    rows = [dm.train_set[i] for i in range(0, len(dm.train_set), max(1, len(dm.train_set) // 1500))]
    rows += [facts[i] for i in range(1500)]
    for row in rows:
        text = TOK.decode(row["input_ids"].tolist() + row["labels"][-1:].tolist())
        assert not any(p in text for p in phrases), [p for p in phrases if p in text]
        assert not spec_key.search(text)
    haystack = TOK.encode(embedded_text()[:50_000])
    for seed in range(200):
        tokens, stated = fact_sequence(haystack, TOK, 257, seed)
        text = TOK.decode(tokens).lower()  # a key opening a sentence is capitalised
        assert len(tokens) == 257 and (tokens, stated) == fact_sequence(haystack, TOK, 257, seed) and 1 <= len(stated) <= 3
        for key, attribute, value in stated:
            first, last, value = text.find(key.lower()), text.rfind(key.lower()), value.lower()
            assert 0 <= first < last and text.count(value) >= 2 and text.rfind(value) > last  # recalled after it
    assert fact_sequence(haystack, TOK, 257, 0) != fact_sequence(haystack, TOK, 257, 1)
    # data.facts_same_words=1: every recall restates its fact word for word; data.facts_per_row bounds the facts
    for seed in range(50):
        tokens, stated = fact_sequence(haystack, TOK, 1025, seed, max_facts=6, same_words=1.0)
        text = TOK.decode(tokens)
        assert len(stated) <= 6 and len(fact_sequence(haystack, TOK, 1025, seed, max_facts=1)[1]) == 1
        lower = text.lower()
        for key, attribute, value in stated:
            start = lower.find(key.lower())
            statement = text[start : text.find(value, start) + len(value)]  # key ... value, as first said
            assert value in statement and text.count(statement) >= 2
    with pytest.raises(Exception, match="facts_same_words"):
        DataConfig(facts_same_words=1.5)


def test_shared_form_fact_rows_differ_only_in_their_keys_and_leave_other_rows_as_they_were():
    """data.facts_shared: a shared-form row holds 2+ facts with one attribute, distinct values of one format
    and one sentence form, each recalled after it, so that a recall says which value it wants only by its
    key; facts_shared=0 draws exactly the rows it drew before the option existed."""
    from lit.facts import VALUE_FORMATS, fact_sequence
    from lit.needles import parse_pattern

    haystack = TOK.encode(embedded_text()[:50_000])
    for seed in range(200):
        tokens, stated = fact_sequence(haystack, TOK, 257, seed, max_facts=3, same_words=0.5, shared=1.0)
        text = TOK.decode(tokens)
        assert len(tokens) == 257 and 2 <= len(stated) <= 3
        assert len({a for _, a, _ in stated}) == 1 and len({v for _, _, v in stated}) == len(stated)
        assert all(v.isalpha() and v.islower() for _, _, v in stated) or any(  # words, or one value format
            all(re.fullmatch(parse_pattern(f).regex, v) for _, _, v in stated) for f in VALUE_FORMATS)
        lower = text.lower()
        for key, _, value in stated:
            assert 0 <= lower.find(key.lower()) < lower.rfind(key.lower()) and text.count(value) >= 2
            assert text.rfind(value) > lower.rfind(key.lower())  # recalled by its key, value after it
        # one statement form: the text between key and value is the same for every fact
        between = {lower[lower.find(k.lower()):].split(v.lower())[0][len(k):] for k, _, v in stated}
        assert len(between) == 1, between
    for seed in range(3000):  # two long facts that do not fit are drawn again, never an error
        assert len(fact_sequence(haystack, TOK, 257, seed, 3, 0.5, shared=1.0)[0]) == 257
    mixed = [fact_sequence(haystack, TOK, 257, seed, 3, 0.5, shared=1.0)[1] for seed in range(200)]
    assert mixed != [fact_sequence(haystack, TOK, 257, seed, 3, 0.5)[1] for seed in range(200)]
    digest = hashlib.sha1()  # the rows of facts_shared=0, as drawn before the option existed (published pilots)
    for seed in range(300):
        digest.update(str(fact_sequence(haystack, TOK, 257, seed, 3, 0.5, shared=0.0)).encode())
    assert digest.hexdigest() == "4bccf93a02509e760b9def38e35999c77dac7dc5"
    half = [len({a for _, a, _ in fact_sequence(haystack, TOK, 257, s, 3, 0.5, shared=0.5)[1]}) for s in range(400)]
    assert 0.3 < sum(n == 1 for n in half) / 400 < 0.8  # about half the rows shared (and a few 1-fact mixed rows)
    with pytest.raises(Exception, match="facts_shared"):
        DataConfig(facts_shared=-0.1)


def test_fact_answer_weights_mark_the_recall_values_and_nothing_else():
    """data.facts_answer_weight: the labels that are a recall's value get the weight, every other label 1
    (other kinds of rows too, in the batch); the rows themselves are the same as without it."""
    from lit.data import fact_row
    from lit.facts import fact_sequence, fact_sequence_with_answers

    haystack = TOK.encode(embedded_text()[:50_000])
    for seed in range(200):
        tokens, stated, answers = fact_sequence_with_answers(haystack, TOK, 257, seed, 3, 0.5, shared=0.3)
        assert (tokens, stated) == fact_sequence(haystack, TOK, 257, seed, 3, 0.5, shared=0.3)
        assert [TOK.decode(tokens[a:b]) for a, b in answers] == [v for _, _, v in stated]
        text = TOK.decode(tokens).lower()
        for (key, _, _), (a, _) in zip(stated, answers):
            assert len(TOK.decode(tokens[:a])) > text.rfind(key.lower())  # the recall's value, after its key
        row = fact_row(haystack, TOK, 256, 3, 0.5, 0.3, seed=seed, answer_weight=4.0)
        weighted = {i + 1 for i, w in enumerate(row["loss_weights"]) if w == 4.0}  # label i is token i + 1
        assert weighted == {p for a, b in answers for p in range(a, b)} and set(row["loss_weights"]) <= {1.0, 4.0}
        assert "loss_weights" not in fact_row(haystack, TOK, 256, 3, 0.5, 0.3, seed=seed)
    dm = FwPKMDataModule(seq_len=128, batch_size=16, max_documents=200, facts_fraction=0.4, repeat_fraction=0.2,
                         facts_answer_weight=4.0)
    batch = next(iter(dm.train_dataloader()))
    weights = batch["loss_weights"]
    assert weights.shape == batch["labels"].shape and weights.dtype == torch.float32
    assert (weights == 4.0).any() and (weights == 1.0).all(-1).any()  # fact rows and the others in one batch
    assert "loss_weights" not in next(iter(FwPKMDataModule(seq_len=128, batch_size=16, max_documents=200,
                                                           facts_fraction=0.4).train_dataloader()))
    with pytest.raises(Exception, match="facts_answer_weight"):
        DataConfig(facts_answer_weight=0)


def test_facts_recalled_several_times_use_distinct_forms_after_their_statement_and_no_template():
    """data.facts_recalls: each fact is recalled up to that many times, in distinct recall forms, every recall
    after the statement and its answer span exactly the value; rows fit their length, mixed and shared rows
    alike, and never hold an evaluation template; 1 (the default) draws the rows it drew before."""
    from lit.data import fact_row
    from lit.facts import RECALLS, fact_sequence, fact_sequence_with_answers, render
    from lit.needles import shipped_families

    haystack = TOK.encode(embedded_text()[:50_000])
    phrases = sorted({p for f in shipped_families().values() for p in f.fixed_phrases()})
    recalls_seen = []
    for shared in (0.0, 1.0):
        for seed in range(150):
            tokens, stated, answers = fact_sequence_with_answers(haystack, TOK, 257, seed, 3, 0.0, shared=shared,
                                                                 recalls=3)
            text = TOK.decode(tokens)
            assert len(tokens) == 257 and not any(p in text for p in phrases)
            assert len(stated) <= len(answers) <= 3 * len(stated)
            values = [TOK.decode(tokens[a:b]) for a, b in answers]
            assert set(values) == {v for _, _, v in stated}
            for key, attribute, value in stated:
                first_key = text.lower().find(key.lower())
                spans = [(a, b) for (a, b), v in zip(answers, values) if v == value]
                recalls_seen.append(len(spans))
                assert all(len(TOK.decode(tokens[:a])) > first_key for a, _ in spans)  # after the statement
                # each recall in its own form (one may be the statement's form: it is also a recall form)
                forms = [f for f in RECALLS if render(f, key, attribute, value) in text]
                assert len(forms) >= len(spans) - 1, (forms, text)
    assert max(recalls_seen) == 3 and min(recalls_seen) == 1 and 1.8 < sum(recalls_seen) / len(recalls_seen) < 3
    for seed in range(100):  # recalls=1 is the old row
        assert fact_sequence(haystack, TOK, 257, seed, 3, 0.5, shared=0.5, recalls=1) == \
            fact_sequence(haystack, TOK, 257, seed, 3, 0.5, shared=0.5)
    row = fact_row(haystack, TOK, 256, 3, 0.5, 0.0, seed=7, answer_weight=4.0, recalls=3)
    _, _, answers = fact_sequence_with_answers(haystack, TOK, 257, 7, 3, 0.5, shared=0.0, recalls=3)
    assert {i + 1 for i, w in enumerate(row["loss_weights"]) if w == 4.0} == {p for a, b in answers for p in range(a, b)}
    assert len(RECALLS) >= 3
    with pytest.raises(Exception, match="facts_recalls"):
        DataConfig(facts_recalls=0)
