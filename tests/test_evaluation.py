"""Evaluations on a tiny random model: perplexity, NIAH protocol, gates and memory inspection."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
import torch

from fwpkm import HybridLM
from lit.evaluation.inspect import MemoryInspector, addressing_stats, collect_gates, gate_summary
from lit.plots import gate_histograms
from lit.evaluation.common import preserved_fast_weights, stream
from lit.evaluation.niah import NIAHConfig, answer_sample, heatmaps, likelihood_margins, make_samples, run_niah, summarise
from lit.evaluation.ppl import streamed_perplexity, windowed_perplexity
from lit.synthetic import make_niah_sample
from lit.tokenizer import ByteTokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump. Sphinx of black quartz, judge my vow. ") * 40


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture
def model(micro_config, tok):
    torch.manual_seed(0)
    return HybridLM(micro_config("tiny-swa_interleave-pkm-fwpkm", vocab_size=tok.vocab_size)).eval()


def test_streamed_perplexity_on_short_input_equals_windowed(model, tok):
    ids = torch.tensor(tok.encode(TEXT[:97]))
    before = model.fast_weight_state()
    windowed = windowed_perplexity(model, ids, window=96)
    streamed = streamed_perplexity(model, ids, segment_len=13)
    assert windowed.tokens == streamed.tokens == 96
    assert streamed.loss == pytest.approx(windowed.loss, rel=1e-5)
    torch.testing.assert_close(streamed.position_loss, windowed.position_loss, rtol=1e-4, atol=1e-5)
    for k, t in model.fast_weight_state().items():  # evaluation leaves the checkpoint's memory alone
        assert torch.equal(t, before[k])
    rows = streamed.position_table(n_bins=4)
    assert [r["start"] for r in rows] == [0, 24, 48, 72] and sum(r["tokens"] for r in rows) == 96


def count_writes(model, monkeypatch):
    writes = {"n": 0}
    for memory in model.fast_weight_memories().values():
        original = memory._write

        def counted(*args, _original=original, **kwargs):
            writes["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(memory, "_write", counted)
    return writes


@pytest.mark.parametrize("passes", [0, 1, 3])
def test_niah_protocol_writes_exactly_once_per_pass(model, tok, monkeypatch, passes):
    sample = make_niah_sample(TEXT, tok, context_len=300, seed=1)
    writes = count_writes(model, monkeypatch)
    cfg = NIAHConfig(segment_len=64)
    before = model.fast_weight_state()
    states = []
    original_flush = model.flush
    monkeypatch.setattr(model, "flush", lambda cache: (original_flush(cache), states.append(model.fast_weight_state())))
    answer, _ = answer_sample(model, tok, sample, passes, cfg)
    n_layers = len(model.fast_weight_memories())
    assert writes["n"] == passes * n_layers  # no write at all while reading the question and decoding
    assert len(states) == passes
    for a, b in zip([before] + states, states):  # the state changed at every pass
        assert any(not torch.equal(a[k], b[k]) for k in a)
    assert len(answer) >= 1


@pytest.mark.parametrize("passes", [0, 2])
def test_niah_answer_nll_is_the_one_shot_likelihood_and_leaves_the_decoded_answer_alone(model, tok, passes):
    """The teacher-forced answer likelihood, fed through a copy of the streamed prompt's cache, equals one
    forward of prompt + answer in a single chunk from the same fast weights; decoding is unchanged by it."""
    sample = make_niah_sample(TEXT, tok, context_len=300, seed=3)
    cfg = NIAHConfig(segment_len=64)
    decoy = tok.encode("0123")
    with preserved_fast_weights(model):
        predicted, (nll, decoy_nll) = answer_sample(model, tok, sample, passes, cfg, [decoy])
    with preserved_fast_weights(model), torch.no_grad():
        context = torch.tensor([sample.context_ids])
        for _ in range(passes):
            cache, _ = stream(model, context, 64, keep_logits=False, chunk_size=context.shape[1])
            model.flush(cache)
        expected = [_one_shot_nll(model, sample.input_ids, answer) for answer in (sample.answer_ids, decoy)]
        decoded = None if passes else tok.decode(_greedy(model, sample))
    assert [nll, decoy_nll] == pytest.approx(expected, rel=1e-4)
    if decoded is not None:
        assert predicted == decoded


def _one_shot_nll(model, prompt: list[int], answer: list[int]) -> float:
    ids = torch.tensor([prompt + answer[:-1]])
    logits = model(ids, cache=model.new_cache(ids.shape[1] + 1)).logits[0, len(prompt) - 1:]
    return float(-torch.log_softmax(logits, -1)[torch.arange(len(answer)), answer].mean())


def _greedy(model, sample) -> list[int]:
    cache = model.new_cache(len(sample.input_ids) + len(sample.answer_ids))
    token = model(torch.tensor([sample.input_ids]), cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    out = [int(token)]
    for _ in range(len(sample.answer_ids) - 1):
        token = model(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(token))
    return out


def test_niah_likelihood_margins_pair_each_question_with_its_zero_pass_and_decoy_likelihoods():
    nlls = [{0: (2.0, 2.1, 2.0), 2: (1.0, 2.0, 1.5)}, {0: (3.0, 3.0, 2.9), 2: (1.5, 3.5, 1.0)},
            {0: (1.0, 1.0, 1.1), 2: (1.25, 1.0, math.nan)}]
    rows = [{"family": "spec", "question": q, "context_len": 256, "iterations": n, "answer_nll": true,
             "random_value_nll": random_value, "other_needle_nll": other}
            for q, by_passes in enumerate(nlls) for n, (true, random_value, other) in by_passes.items()]
    rows.append({"family": "spec", "question": 7, "context_len": 256, "iterations": 2, "answer_nll": 0.0,
                 "random_value_nll": 0.0})  # no zero-pass partner
    zero, two = likelihood_margins(rows)
    assert (zero["iterations"], two["iterations"]) == (0, 2) and math.isnan(zero["nll_gain"])
    assert two["nll_gain"] == pytest.approx((1.0 + 1.5 - 0.25) / 3)
    assert two["nll_gain_low"] < two["nll_gain"] < two["nll_gain_high"]
    assert two["over_random"] == pytest.approx((1.0 + 2.0 - 0.25 + 0.0) / 4) and two["questions"] == 4
    assert two["over_other"] == pytest.approx((0.5 - 0.5) / 2)
    assert zero["over_random"] == pytest.approx(0.1 / 3) and zero["over_other"] == pytest.approx(-0.1 / 3 + 0.1 / 3)


def test_niah_end_to_end_table_and_heatmaps(model, tok, tmp_path):
    cfg = NIAHConfig(context_lens=[300, 500], depths=[0.25, 0.75], iterations=[0, 2], samples_per_cell=1,
                     segment_len=128)
    rows = run_niah(model, tok, tok.encode(TEXT), cfg, progress=False)
    assert len(rows) == 2 * 2 * 2
    assert all(0 <= r["digit_acc"] <= 1 and r["exact"] in (0.0, 1.0) and r["answer_nll"] > 0 for r in rows)
    summary = summarise(rows)
    assert {(s["context_len"], s["iterations"]) for s in summary} == {(300, 0), (300, 2), (500, 0), (500, 2)}
    margins = likelihood_margins(rows)
    assert {(m["context_len"], m["iterations"], m["questions"]) for m in margins} == {(c, n, 2) for c in (300, 500) for n in (0, 2)}
    assert all(r["random_value_nll"] > 0 and r["other_needle_nll"] > 0 and r["random_value_nll"] != r["answer_nll"]
               for r in rows)
    files = heatmaps(rows, str(tmp_path / "niah"))
    assert [p.endswith(f"_n{n}.png") for p, n in zip(files, [0, 2])] == [True, True]


def test_niah_config_errors():
    with pytest.raises(ValueError, match="chunk_policy"):
        NIAHConfig(chunk_policy="sometimes")
    with pytest.raises(ValueError, match="depths"):
        NIAHConfig(depths=[1.5])
    with pytest.raises(ValueError, match="n_needles"):
        NIAHConfig(n_needles=0)


@pytest.mark.parametrize("needles", [1, 2, 5])
def test_niah_samples_hold_the_configured_needles_and_ask_for_the_one_at_the_depth(tok, needles):
    cfg = NIAHConfig(context_lens=[400], depths=[0.5], samples_per_cell=2, n_needles=needles)
    for family, length, depth, sample in make_samples(tok.encode(TEXT), tok, cfg):
        text = tok.decode(sample.context_ids)
        assert len(sample.keys) == needles and all(k in text for k in sample.keys)
        assert sample.keys[0] in tok.decode(sample.question_ids) and sample.answer == sample.values[0]
        assert abs(sample.depths[0] - 0.5) < 0.2 and len(sample.context_ids) + len(sample.question_ids) == 400


def test_gates_and_addressing_statistics(model, tok, tmp_path):
    ids = torch.tensor(tok.encode(TEXT[:128])).view(2, 64)
    gates = collect_gates(model, [ids])
    assert set(gates) == set(model.fast_weight_memories())
    rows = gate_summary(gates)
    assert all(0 < r["mean"] < 1 and r["tokens"] == 128 for r in rows)
    assert (tmp_path / "gates.png").samefile(gate_histograms(gates, str(tmp_path / "gates.png")))
    stats = addressing_stats(model, [ids])
    assert all(0 < r["coverage_ratio"] <= 1 and r["kl_to_uniform"] >= 0 for r in stats)


def test_inspection_finds_the_slots_a_pair_wrote(model, tok):
    ids = tok.encode(TEXT[:40])
    layer, memory = next(iter(model.fast_weight_memories().items()))
    before = memory.values.clone()
    inspector = MemoryInspector(model, tok)
    reads = inspector.read(ids, chunk_size=len(ids))  # one write of the whole text
    indices, weights = reads[layer]
    t = 17
    written = inspector.slots_written_by(layer, [t + memory.lookahead])
    assert set(written) == set(indices[t].flatten().tolist())
    for slot in written:
        history = inspector.slot_history(layer, slot)
        assert any(w.position == t and w.query_token == ids[t] and w.target_token == ids[t + 1] for w in history)
    changed = set((memory.values != before).any(-1).nonzero().flatten().tolist())
    assert set(written) <= changed  # the recorded slots are really the ones that moved
    never_read = set(range(memory.values.shape[0])) - set(indices.flatten().tolist())
    assert not (changed & never_read)


def test_needle_inspection_reports_written_and_read_slots(model, tok):
    sample = make_niah_sample(TEXT, tok, context_len=300, seed=3)
    report = MemoryInspector(model, tok).needle(sample)
    assert {r["layer"] for r in report} == set(model.fast_weight_memories())
    for r in report:
        assert r["written_slots"] and len(r["read_slots"]) == 8 * 1  # heads * topk of the micro model
        assert set(r["overlap"]) <= set(r["written_slots"])


def test_needle_binding_is_the_answer_reads_weight_on_the_slots_each_needles_value_pair_wrote(model, tok):
    """on_asked / on_other, recomputed from the raw reads: the pair (t, t + lookahead) whose target is a
    needle's first value token wrote exactly the slots token t read (spec 1.2), and the answer's read is the
    question's last token's; a needle found at the wrong offset, or the other needle's slots, give other shares."""
    cfg = NIAHConfig(context_lens=[300], depths=[0.3], samples_per_cell=3, n_needles=2, families=["all"])
    inspector = MemoryInspector(model, tok)
    checked = 0
    for family, _, _, sample in make_samples(tok.encode(TEXT), tok, cfg):
        report = {r["layer"]: r for r in inspector.needle(sample)}
        with preserved_fast_weights(model):  # the same write, again
            reads = inspector.read(sample.context_ids, chunk_size=len(sample.context_ids))
            _, run = stream(model, torch.tensor([sample.input_ids]), 2048, keep_logits=False,
                            chunk_size=len(sample.input_ids) + 1, record=True)
        text = tok.decode(sample.context_ids)
        for layer, memory in inspector.layers.items():
            ids, w = run.cat("indices", layer)[0, -1].flatten(), run.cat("weights", layer)[0, -1].flatten().abs()
            share = []
            for i, value in enumerate(sample.values):
                start = len(tok.encode(text[:text.index(value, len(tok.decode(sample.context_ids[:sample.needle_positions[i]])))]))
                wrote = set(reads[layer][0][start - memory.lookahead].flatten().tolist())
                share.append(float(w[torch.tensor([int(j) in wrote for j in ids])].sum() / w.sum()))
            asked, other = share[sample.target_index], share[1 - sample.target_index]
            assert report[layer]["on_asked"] == pytest.approx(asked, abs=1e-6), family
            assert report[layer]["on_other"] == pytest.approx(other, abs=1e-6), family
            checked += asked != other
    assert checked  # the two needles' shares differ somewhere: the test tells them apart


def test_niah_families_each_reported_and_the_held_out_ones_pooled(model, tok, tmp_path):
    """Every family's needles and questions are its own; the spec's family draws the samples it drew before
    families existed; rows, cells and metrics are per family, with ``held-out`` pooling the non-spec ones."""
    from lit.evaluation.niah import FAMILY_CELL, niah_metrics, with_held_out
    from lit.needles import parse_pattern, shipped_families

    families = shipped_families()
    cfg = NIAHConfig(context_lens=[400], depths=[0.3, 0.7], samples_per_cell=2, n_needles=2, families=["all"])
    samples = make_samples(tok.encode(TEXT), tok, cfg)
    assert [f for f, *_ in samples] == [f for f in families for _ in range(4)]
    for name, _, _, sample in samples:
        family = families[name]
        value = re.compile(parse_pattern(family.value).regex)
        assert family.needle_text(sample.keys[0], sample.values[0]) in tok.decode(sample.context_ids)
        assert tok.decode(sample.question_ids) == family.question_text(sample.keys[0])
        assert value.fullmatch(sample.answer) and sample.answer == sample.values[0]
    before = make_samples(tok.encode(TEXT), tok, NIAHConfig(context_lens=[400], depths=[0.3, 0.7], samples_per_cell=2,
                                                            n_needles=2))
    assert [s.input_ids for *_, s in before] == [s.input_ids for f, *_, s in samples if f == "spec"]

    rows = [{"family": f, "context_len": L, "depth": d, "iterations": 0, "answer": s.answer, "predicted": s.answer,
             "exact": float(f == "vault"), "digit_acc": 1.0} for f, L, d, s in samples]
    cells = {c["family"]: c for c in summarise(with_held_out(rows), by=FAMILY_CELL)}
    assert set(cells) == set(families) | {"held-out"}
    assert cells["held-out"]["questions"] == 4 * (len(families) - 1) and cells["held-out"]["exact"] == 1 / (len(families) - 1)
    metrics = niah_metrics(rows)
    assert metrics["niah/questions/Fheld-out/L400/n0"] == 16 and metrics["niah/exact/Fvault/L400/n0"] == 1.0
    assert metrics["niah/exact/Fspec/L400/n0"] == 0.0 and metrics["niah/exact/L400/n0"] == 4 / 20
    assert len(heatmaps(rows, str(tmp_path / "h"))) == len(families)  # one per family and number of passes
    mine = [r | {"family": "mine"} for r in rows if r["family"] == "vault"]  # your own family is not pooled in
    pooled = {c["family"]: c for c in summarise(with_held_out(rows + mine), by=FAMILY_CELL)}["held-out"]
    assert pooled["questions"] == 16


def test_eval_cli_on_a_trained_checkpoint_logs_into_its_run(micro_training, tmp_path):
    """Train a micro run, then `fwpkm eval niah|ppl|gates|inspect` on its run folder."""
    import subprocess
    import sys

    run_dir = tmp_path / "runs" / "micro"
    micro_training.run(run_dir, "--trainer.max_steps", "3")
    commands = [
        ["niah", "--context-lens", "300", "--depths", "0.5", "--iterations", "0", "1", "--samples", "1",
         "--needles", "2"],
        ["ppl", "--max-tokens", "2048", "--window", "64", "--stream-len", "512", "--segment-len", "100"],
        ["gates", "--max-tokens", "1024", "--window", "64"],
        ["mqar", "--pairs", "4", "8", "--samples", "2", "--vocab", "200", "--min-seq-len", "32"],
        ["inspect", "--text", "The cat sat on the mat. The cat sat on the mat."],
        ["inspect", "--needle", "--context-len", "300", "--families", "spec", "vault", "--depths", "0.5"],
        ["ppl", "--max-tokens", "2048", "--window", "64", "--stream-len", "512", "--segment-len", "100",
         "--fresh-memory"],
    ]
    for args in commands:
        proc = subprocess.run([sys.executable, "-m", "ablations", "eval", *args, "--ckpt", str(run_dir)],
                              cwd=micro_training.root, env=micro_training.env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"logged into MLflow run {micro_training.run_id(run_dir)}" in proc.stdout
    client = micro_training.mlflow_client(run_dir)
    run = client.get_run(micro_training.run_id(run_dir))
    assert "niah/exact_300_n1" in run.data.metrics and "eval/streamed_ppl" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/niah", "eval/ppl", "eval/gates", "eval/inspect", "eval/mqar"} <= logged
    assert {"mqar/acc/P4", "mqar/acc/P8"} <= set(run.data.metrics)
    assert (run_dir / "eval" / "niah" / "heatmap_n1.png").is_file()
    binding = pd.read_csv(run_dir / "eval" / "inspect" / "needle_binding.csv")
    assert set(binding["family"]) == {"spec", "vault"} and (binding["questions"] == 1).all()
    assert binding[["on_asked", "on_other"]].apply(lambda c: c.between(0, 1)).all().all()
    # --fresh-memory: beside the checkpoint-memory figures, not over them, and from other fast weights
    assert "eval/ppl-fresh_memory" in logged and (run_dir / "eval" / "ppl-fresh_memory" / "summary.csv").is_file()
    fresh = run.data.metrics["fresh_memory/eval/streamed_ppl"]
    assert math.isfinite(fresh) and fresh != run.data.metrics["eval/streamed_ppl"]


def test_eval_logs_into_the_store_the_run_was_trained_into(micro_training, tmp_path):
    """An ablation's run folder (runs/ablations/GRID/VARIANT/seedS) sits below its store (runs/mlflow.db):
    eval logs into the store the run's config.yaml records, not into a database beside the run; a run
    missing from its store gets one line naming the store, after the results are written."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    run_dir = tmp_path / "runs" / "ablations" / "grid" / "variant" / "seed0"
    micro_training.run(run_dir, "--trainer.max_steps", "2", "--tracking.uri", store)
    run_id = micro_training.run_id(run_dir)

    def eval_ppl():
        return subprocess.run([sys.executable, "-m", "ablations", "eval", "ppl", "--max-tokens", "1024", "--window",
                               "64", "--stream-len", "256", "--segment-len", "100", "--ckpt", str(run_dir)],
                              cwd=micro_training.root, env=micro_training.env(), capture_output=True, text=True,
                              timeout=300)

    proc = eval_ppl()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"logged into MLflow run {run_id}" in proc.stdout
    assert "eval/streamed_ppl" in MlflowClient(store).get_run(run_id).data.metrics
    assert not (run_dir.parent / "mlflow.db").exists()

    config = run_dir / "config.yaml"
    other = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    config.write_text(config.read_text().replace(store, other))
    proc = eval_ppl()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"not logged into MLflow: run {run_id}" in proc.stderr and other in proc.stderr
    assert (run_dir / "eval" / "ppl" / "summary.csv").is_file()


def test_fresh_memory_is_a_seeded_reinitialisation_of_the_fast_weights_only(model):
    slow = {k: v.clone() for k, v in model.named_parameters()}
    trained = {k: v + 1.0 for k, v in model.fast_weight_state().items()}
    model.load_fast_weight_state(trained)
    rng = torch.get_rng_state()
    model.reset_fast_weights(seed=3)
    first = model.fast_weight_state()
    model.load_fast_weight_state(trained)
    model.reset_fast_weights(seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    assert first.keys() == trained.keys() and all(torch.equal(first[k], v) for k, v in model.fast_weight_state().items())
    assert all(not torch.equal(first[k], trained[k]) for k in first)
    model.reset_fast_weights(seed=4)
    assert any(not torch.equal(first[k], v) for k, v in model.fast_weight_state().items())
    assert all(torch.equal(slow[k], v) for k, v in model.named_parameters())


def test_eval_cli_errors_are_clear(tmp_path, capsys):
    from ablations.__main__ import main

    # one line naming the option, exit code 2, no traceback (the issue-18 contract for every fwpkm command)
    assert main(["eval", "ppl", "--ckpt", str(tmp_path / "missing"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "--ckpt" in err and "Traceback" not in err
    assert main(["eval", "niah", "--chunk-policy", "sometimes"]) == 2
    err = capsys.readouterr().err
    assert "--chunk-policy" in err and "sometimes" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "niah", "--preset", "tiny", "--families", "spec", "nope", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "--families='nope'" in err and "vault" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "niah", "--preset", "tiny", "--key-format", "K[0-9]{3}", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "missing: --needle-text, --question-text, --value-format" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "niah", "--preset", "tiny", "--needle-text", "no placeholders", "--question-text", "{key}",
                 "--key-format", "K[0-9]{3}", "--value-format", "[0-9]{4}", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "needle family 'custom'" in err and "{key}" in err and len(err.strip().splitlines()) == 1


def test_slot_ranks_order_every_slot_as_the_read_does(model, tok):
    """A read selects the slots of ranks 0..topk-1 (spec 1.1): the ranks of the slots the question's last token
    read are exactly those, per head, and the ranks of all n^2 slots are one order of them."""
    from lit.evaluation.inspect import slot_ranks

    ids = tok.encode(TEXT)[:120]
    inspector = MemoryInspector(model, tok)
    with preserved_fast_weights(model), inspector.recording_queries() as seen:
        reads = inspector.read(ids, chunk_size=len(ids))
    for layer, memory in inspector.layers.items():
        c = memory.config
        q = torch.cat(seen[layer][0], dim=1)[0, -1]
        keys = seen[layer][1]
        read = reads[layer][0][-1]  # [H, k]
        for h in range(c.heads):
            head_keys = keys[h:h + 1]
            head_q = q.view(c.heads, -1)[h]
            assert sorted(slot_ranks(head_q, head_keys, read[h].tolist(), c.score).tolist()) == list(range(c.topk))
        every_slot = slot_ranks(q.view(c.heads, -1)[0], keys[:1], range(c.n_slots), c.score)
        assert sorted(every_slot.tolist()) == list(range(c.n_slots))  # one order: no two slots share a rank


@pytest.mark.parametrize("says", ["asked", "other", "neither"])
def test_niah_tells_an_answer_of_the_other_needles_value_from_the_asked_one(model, tok, monkeypatch, says):
    import lit.evaluation.niah as niah

    def answer(model, tokenizer, sample, n, cfg, decoys):  # a model that says the asked, the other or no value
        value = {"asked": sample.values[0], "other": sample.values[-1], "neither": "none"}[says]
        return value + ".", [1.0, 2.0, 3.0]

    monkeypatch.setattr(niah, "answer_sample", answer)
    cfg = NIAHConfig(context_lens=[300], depths=[0.25, 0.75], iterations=[0], samples_per_cell=2, n_needles=3)
    rows = run_niah(model, tok, tok.encode(TEXT), cfg, progress=False)
    (summary,) = summarise(rows)
    assert (summary["exact"], summary["other_exact"]) == {"asked": (1.0, 0.0), "other": (0.0, 1.0),
                                                           "neither": (0.0, 0.0)}[says]
    one_needle = run_niah(model, tok, tok.encode(TEXT), NIAHConfig(context_lens=[300], depths=[0.5], iterations=[0],
                                                                  samples_per_cell=1, n_needles=1), progress=False)
    assert math.isnan(summarise(one_needle)[0]["other_exact"])  # no other needle, no such share
