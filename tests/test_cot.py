"""Chain of thought: TSV tasks, gsm8k mapping, templates, answer extraction, self-consistency (tiny model)."""
import io
import os

import jax
import numpy as np
import pytest
import seqio

from flan_jax.cli import data as data_cli

from flan_jax.data import mixing, registry
from flan_jax.models import t5
from flan_jax.data.templates import extract_cot_answer
from flan_jax.evaluation import self_consistency
from flan_jax.tasks import cot

COT_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "cot")


def test_templates_are_ours_and_enough():
    assert len(cot.DIRECT_TEMPLATES) >= 8 and len(cot.COT_TEMPLATES) >= 8
    for template in cot.COT_TEMPLATES:
        _, target = template.render({"question": "q", "answer": "42", "rationale": "Because 6 * 7 = 42."})
        assert extract_cot_answer(target) == "42"


def test_gsm8k_record():
    record = cot.gsm8k_record({"question": "Q?", "answer": "He has 2*3=<<2*3=6>>6 pens.\nSo 6+1=<<6+1=7>>7.\n#### 7",
                               "short_answer": "7"})
    assert record == {"question": "Q?", "rationale": "He has 2*3=6 pens. So 6+1=7.", "answer": "7"}
    assert cot.gsm8k_record({"question": "Q", "answer": "steps", "short_answer": "3"})["answer"] == "3"
    assert cot.gsm8k_record({"question": "Q", "answer": "steps", "short_answer": " "}) is None


def test_tsv_task_cot_variant_and_errors_counted():
    names = cot.register(COT_DIR, include_gsm8k=False)
    assert names == ["cot_arith"]
    assert registry.task_spec("cot_arith").num_examples("validation") == 7  # 6 rows + 1 malformed row
    registry.reset_data_error_counts()
    task = seqio.get_mixture_or_task("cot_arith_cot")
    examples = list(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
    assert len(examples) == 6 and registry.data_error_counts("cot_arith_cot") == {"record_is_none": 1}
    for ex in examples:
        target = ex["targets_pretokenized"].decode()
        assert target.startswith("Tom starts with") and extract_cot_answer(target).isdigit()
        assert task.postprocess_fn(target) == extract_cot_answer(target)
    direct = next(seqio.get_mixture_or_task("cot_arith_zs_noopt").get_dataset(
        None, split="validation", shuffle=False).as_numpy_iterator())
    assert direct["targets_pretokenized"] == b"30"  # 26 + 4


def test_self_consistency_votes_on_extracted_answers():
    samples = [["... so the answer is 7.", "The answer is (7)", "Answer: 8"],
               ["answer is 3", "answer is 4"],          # tie: first reached wins
               ["", "   "]]
    assert self_consistency.self_consistency(samples) == ["7", "3", ""]


def test_sample_self_consistency_on_tiny_model():
    config = t5.T5Config.preset("tiny")
    params = t5.init_params(config, jax.random.PRNGKey(0))
    vocab = seqio.ByteVocabulary()
    tokens = np.zeros([2, 8], np.int32)
    tokens[0, :4] = vocab.encode("1+1") + [1]
    tokens[1, :3] = vocab.encode("ab") + [1]
    answers, samples = self_consistency.sample_self_consistency(config, params, tokens, vocabulary=vocab,
                                                   rng=jax.random.PRNGKey(1), num_samples=3, temperature=0.0,
                                                   max_decode_len=6)
    assert len(answers) == 2 and [len(s) for s in samples] == [3, 3]
    assert all(len(set(s)) == 1 for s in samples)   # temperature 0 = greedy: the k samples agree
    assert answers == self_consistency.self_consistency(samples)
    _, hot = self_consistency.sample_self_consistency(config, params, tokens, vocabulary=vocab, rng=jax.random.PRNGKey(1),
                                         num_samples=4, temperature=5.0, max_decode_len=6)
    assert any(len(set(s)) > 1 for s in hot)         # high temperature: samples differ
    with pytest.raises(ValueError, match="num_samples"):
        self_consistency.sample_self_consistency(config, params, tokens, vocabulary=vocab, rng=jax.random.PRNGKey(1),
                                    num_samples=0)


FLAN_COT_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "cot_flan")


def test_flan_cot_files_as_they_are_with_held_out_validation(tmp_path):
    # Both layouts side by side: FLAN's <name>_train.tsv files and a <name>/ folder of split files.
    for entry in os.listdir(FLAN_COT_DIR):
        os.symlink(os.path.join(FLAN_COT_DIR, entry), tmp_path / entry)
    os.symlink(os.path.join(COT_DIR, "arith"), tmp_path / "arith")
    assert cot.register(str(tmp_path), include_gsm8k=False) == ["cot_arith", "cot_marbles", "cot_yes_no"]
    spec = registry.task_spec("cot_marbles")
    rows = [line.split("\t") for line in open(os.path.join(FLAN_COT_DIR, "marbles_train.tsv")).read().splitlines()]
    questions = [r[0] for r in rows if len(r) == 3]
    assert len(rows) == 42 and len(questions) == 41          # one row has two cells
    held_out = [r["question"] for _, r in spec.source.records("validation")]
    train = [r["question"] for _, r in spec.source.records("train") if r is not None]
    assert 0 < len(held_out) < len(train) and not set(held_out) & set(train)
    assert sorted(held_out + train) == sorted(questions)     # a partition of the file (the repeated question too)
    assert spec.num_examples("validation") == len(held_out) and spec.num_examples("train") == len(train) + 1
    shards = [list(spec.source.records("validation", i, 2)) for i in range(2)]
    assert sorted(shards[0] + shards[1], key=lambda p: p[0]) == list(spec.source.records("validation"))
    # Deterministic: a fresh source holds out the same questions, also from the file in reverse order.
    again = cot.flan_file_source(FLAN_COT_DIR, "marbles")
    assert [r["question"] for _, r in again.records("validation")] == held_out
    (tmp_path / "rev").mkdir()
    (tmp_path / "rev" / "marbles_train.tsv").write_text("\n".join(["\t".join(r) for r in reversed(rows)]) + "\n")
    reversed_source = cot.flan_file_source(str(tmp_path / "rev"), "marbles")
    assert [r["question"] for _, r in reversed_source.records("validation")] == held_out[::-1]
    registry.reset_data_error_counts()
    examples = list(seqio.get_mixture_or_task("cot_marbles_cot").get_dataset(
        None, split="train", shuffle=False).as_numpy_iterator())
    assert len(examples) == len(train) and registry.data_error_counts("cot_marbles_cot") == {"record_is_none": 1}
    target = examples[0]["targets_pretokenized"].decode()
    assert target.startswith("Sam starts with 3 marbles.") and extract_cot_answer(target) == "10"
    # A <name>_dev.tsv beside the train file is the validation split; nothing is carved out of train.
    yes_no = registry.task_spec("cot_yes_no").source
    assert yes_no.num_examples("train") == 5 and yes_no.num_examples("validation") == 2
    assert set(mixing.mixture_rates("cot_eval")) == {"cot_arith_cot", "cot_marbles_cot", "cot_yes_no_cot"}


def test_cot_dir_flag_and_env_register_flan_files(monkeypatch):
    out = io.StringIO()
    assert data_cli.main(["list", "--collection", "cot", "--cot-dir", FLAN_COT_DIR], out=out) == 0
    assert "cot_marbles\tHeldOut(TsvSource(marbles): validation = 0.1 of train by hash of question)\t8" in \
        out.getvalue().splitlines()
    # The held-out split reads the whole train file; the malformed train row is not reported as a validation skip.
    for split, summary in (("validation", "shown 1; skipped none"),
                           ("train", "shown 1; skipped 1 record(s) of those read: 1 wrong_cell_count (first at "
                                     f"{FLAN_COT_DIR}/marbles_train.tsv:21)")):
        out = io.StringIO()
        assert data_cli.main(["show", "cot_marbles_cot", "-n", "1", "--split", split, "--cot-dir", FLAN_COT_DIR],
                             out=out) == 0
        assert f"# cot_marbles_cot [{split}]: {summary}" in out.getvalue()
    monkeypatch.setenv(cot.ENV_COT_DIR, FLAN_COT_DIR)
    assert "cot_yes_no" in cot.register_from_env()
