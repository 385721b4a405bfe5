"""Chain of thought: TSV tasks, gsm8k mapping, templates, answer extraction, self-consistency (tiny model)."""
import os

import jax
import numpy as np
import pytest
import seqio

from flan_jax import registry
from flan_jax.models import t5
from flan_jax.templates import extract_cot_answer
from tasks import cot

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
    assert cot.self_consistency(samples) == ["7", "3", ""]


def test_sample_self_consistency_on_tiny_model():
    config = t5.T5Config.preset("tiny")
    params = t5.init_params(config, jax.random.PRNGKey(0))
    vocab = seqio.ByteVocabulary()
    tokens = np.zeros([2, 8], np.int32)
    tokens[0, :4] = vocab.encode("1+1") + [1]
    tokens[1, :3] = vocab.encode("ab") + [1]
    answers, samples = cot.sample_self_consistency(config, params, tokens, vocabulary=vocab,
                                                   rng=jax.random.PRNGKey(1), num_samples=3, temperature=0.0,
                                                   max_decode_len=6)
    assert len(answers) == 2 and [len(s) for s in samples] == [3, 3]
    assert all(len(set(s)) == 1 for s in samples)   # temperature 0 = greedy: the k samples agree
    assert answers == cot.self_consistency(samples)
    _, hot = cot.sample_self_consistency(config, params, tokens, vocabulary=vocab, rng=jax.random.PRNGKey(1),
                                         num_samples=4, temperature=5.0, max_decode_len=6)
    assert any(len(set(s)) > 1 for s in hot)         # high temperature: samples differ
    with pytest.raises(ValueError, match="num_samples"):
        cot.sample_self_consistency(config, params, tokens, vocabulary=vocab, rng=jax.random.PRNGKey(1),
                                    num_samples=0)
