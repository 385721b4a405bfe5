"""Periodic evaluator: ECE and contextual calibration on a scorer whose probabilities are known; few-shot prompts built
from train-split exemplars only, never the evaluated example; the gin -> TrainConfig -> Evaluator path."""
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

import flan_jax.tasks  # noqa: F401  (registers the default collection)
from flan_jax.tasks import default
from flan_jax import models
from flan_jax.evaluation import calibration, evaluator as ev
from flan_jax.data import metrics
from flan_jax.evaluation.suites.common import CONTENT_FREE_INPUTS

CFG = models.T5Config(vocab_size=2048, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1,
                      num_decoder_layers=1, dtype="float32")
LENGTHS = {"inputs": 256, "targets": 64}


def test_ece_matches_hand_computed_bins():
    conf = [0.95, 0.95, 0.62, 0.62, 0.62, 0.25]
    correct = [True, False, True, True, True, False]
    # bins (0.9, 1]: accuracy 0.5 at confidence 0.95; (0.6, 0.7]: 1.0 at 0.62; (0.2, 0.3]: 0.0 at 0.25
    expected = (2 * 0.45 + 3 * 0.38 + 1 * 0.25) / 6
    assert calibration.expected_calibration_error(conf, correct, 10) == pytest.approx(expected)
    assert calibration.expected_calibration_error(conf, correct, 1) == pytest.approx(abs(4 / 6 - np.mean(conf)))
    assert calibration.expected_calibration_error([0.75] * 4, [1, 1, 1, 0], 10) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="equal-length"):
        calibration.expected_calibration_error([0.5, 0.5], [True])


BIAS = {"odd": 0.9, "even": 0.1}     # the constructed model's preference, whatever the input
EVIDENCE = 3.0                       # ... times this for the right answer of a real example


class BiasedScorer:
    """Stands in for the jitted rank scorer: p(option | input) proportional to BIAS[option] * (EVIDENCE if the option
    is the input's answer else 1). Content-free inputs carry no answer, so their distribution is BIAS itself."""

    def __init__(self, vocab, answers):
        self.vocab, self.answers, self.seen_inputs = vocab, answers, []

    def _text(self, tokens):
        return self.vocab.decode([int(t) for t in tokens if t > 1])

    def __call__(self, params, inputs, option_tokens):
        out = np.zeros(option_tokens.shape[:2], np.float32)
        for b in range(len(inputs)):
            text = self._text(inputs[b])
            self.seen_inputs.append(text)
            for k in range(option_tokens.shape[1]):
                option = self._text(option_tokens[b, k])
                if option:
                    out[b, k] = np.log(BIAS[option] * (EVIDENCE if self.answers.get(text) == option else 1.0))
        return out


@pytest.fixture(scope="module")
def biased_evaluator():
    options = ev.EvalOptions(few_shot=1, calibrate=True)
    evaluator = ev.Evaluator("parity_zs_opt", LENGTHS, CFG, seen_base_tasks={"parity"}, examples_per_task=12,
                             batch_size=4, options=options)
    d = evaluator.data[0]
    scorer = BiasedScorer(evaluator.vocab, {})
    scorer.answers = {scorer._text(row): t for row, t in zip(d.inputs, d.target_strings)}
    evaluator._rank = scorer
    return evaluator, scorer


def test_calibration_metrics_of_a_model_with_known_bias(biased_evaluator):
    evaluator, scorer = biased_evaluator
    d = evaluator.data[0]
    assert set(d.target_strings) == {"odd", "even"} and len(scorer.answers) == len(d.inputs)
    params = models.init_params(CFG, jax.random.PRNGKey(0))   # the loss still runs the real model
    results = evaluator.evaluate(params)
    r = results["parity_zs_opt"]
    odd = np.mean([t == "odd" for t in d.target_strings])
    # Raw: "odd" always wins (0.9 * 3 vs 0.1; 0.9 vs 0.1 * 3), confident 2.7/2.8 when right and 0.9/1.2 when wrong.
    assert r["accuracy"] == pytest.approx(odd)
    assert r["ece"] == pytest.approx(odd * (1 - 2.7 / 2.8) + (1 - odd) * (0.9 / 1.2))
    # Calibrated: p_cf = BIAS, so diag(p_cf)^-1 p is the evidence alone: always right, at confidence 3/4.
    assert r["calibrated_accuracy"] == pytest.approx(1.0)
    assert r["calibrated_ece"] == pytest.approx(0.25)
    assert results["mean_seen"]["calibrated_accuracy"] == pytest.approx(1.0)   # aggregates carry the new metrics
    # The content-free inputs were scored after each example's own few-shot context.
    vocab = evaluator.vocab
    for context in set(d.contexts):
        for cf in CONTENT_FREE_INPUTS:
            assert vocab.decode(list(vocab.encode(context + cf))) in scorer.seen_inputs, (context, cf)


FEW_SHOT_TASK = "test_eval_few_shot_overlap"
TRAIN = [("in a", "A"), ("in b", "B"), ("in c", "C"), ("in d", "D")]
VALIDATION = [("in a", "A"), ("in e", "E")]        # "in a" is in both splits; "in e" only in validation


@pytest.fixture(scope="module")
def overlap_task():
    def source(split, shuffle_files, seed=None):
        rows = TRAIN if split == "train" else VALIDATION
        return tf.data.Dataset.from_tensor_slices({"inputs": [r[0] for r in rows], "targets": [r[1] for r in rows]})

    vocab = default.vocabulary()
    seqio.TaskRegistry.remove(FEW_SHOT_TASK)
    seqio.TaskRegistry.add(FEW_SHOT_TASK, seqio.FunctionDataSource(source, splits=["train", "validation"]),
                           preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
                           output_features={k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")},
                           metric_fns=[metrics.accuracy])
    yield FEW_SHOT_TASK
    seqio.TaskRegistry.remove(FEW_SHOT_TASK)


def test_few_shot_prompts_use_train_exemplars_never_the_evaluated_example(overlap_task):
    evaluator = ev.Evaluator(overlap_task, LENGTHS, CFG, seen_base_tasks=set(), examples_per_task=None,
                             options=ev.EvalOptions(few_shot=2))
    d = evaluator.data[0]
    assert d.input_strings == ["in a", "in e"]
    # "in a" is skipped as its own exemplar; "in e" takes the first two train records.
    assert d.contexts == ["in b\nB\n\nin c\nC\n\n", "in a\nA\n\nin b\nB\n\n"]
    train_texts = {f"{i}\n{t}" for i, t in TRAIN}
    for context, test_input in zip(d.contexts, d.input_strings):
        shots = context.strip("\n").split("\n\n")
        assert set(shots) <= train_texts and not any(s.startswith(test_input + "\n") for s in shots)
        assert "in e" not in context
    vocab = evaluator.vocab
    for row, context, test_input in zip(d.inputs, d.contexts, d.input_strings):
        ids = [int(t) for t in row if t > 0]
        assert ids == list(vocab.encode(context + test_input)) + [1]
    assert d.truncated == 0 and d.inputs.shape[1] % 32 == 0


def test_few_shot_truncation_is_counted_and_keeps_the_test_input(overlap_task):
    short = {"inputs": 6, "targets": 8}
    d = ev.Evaluator(overlap_task, short, CFG, seen_base_tasks=set(), examples_per_task=None,
                     options=ev.EvalOptions(few_shot=2)).data[0]
    assert d.truncated == 2 and d.inputs.shape[1] == 6
    vocab = d.task.output_features["inputs"].vocabulary
    for row, context, test_input in zip(d.inputs, d.contexts, d.input_strings):
        full = list(vocab.encode(context + test_input))
        assert len(full) > 5 and [int(t) for t in row] == full[-5:] + [1]   # the oldest tokens went
        assert vocab.decode(full[-5:]).endswith(test_input)


def test_few_shot_without_enough_exemplars_names_the_task(overlap_task):
    with pytest.raises(ValueError, match=f"{overlap_task}.*3 usable exemplars, 4 requested"):
        ev.Evaluator(overlap_task, LENGTHS, CFG, seen_base_tasks=set(), examples_per_task=None,
                     options=ev.EvalOptions(few_shot=4))
    with pytest.raises(ValueError, match="few_shot=-1"):
        ev.EvalOptions(few_shot=-1)


def test_gin_train_config_reaches_the_periodic_evaluator(tmp_path):
    import dataclasses
    from flan_jax.train import loop, validation
    from flan_jax.cli import train as main
    cfg = main.train_config(model_dir=str(tmp_path), model=CFG, mixture_or_task_name=default.TRAIN_MIXTURE,
                            task_feature_lengths=LENGTHS, train_steps=1, eval_mixture_or_task_name="parity_zs_opt",
                            eval_examples_per_task=2, eval_few_shot=1, eval_calibrate=True)
    evaluator = loop.make_evaluator(cfg)
    assert evaluator.options == ev.EvalOptions(few_shot=1, calibrate=True)
    assert all(c.count("\n\n") >= 1 for c in evaluator.data[0].contexts)
    assert {"ece", "calibrated_accuracy"} <= validation.metric_names("parity_zs_opt", calibrate=True)
    with pytest.raises(validation.ConfigValueError, match="train.eval_few_shot"):
        validation.validate_config(dataclasses.replace(cfg, eval_few_shot=-1), 1)
