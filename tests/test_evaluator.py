"""Evaluator: padding-independent results, rank classification picks the likeliest option, seen/held-out grouping."""
import copy
import dataclasses

import jax
import numpy as np
import pytest

import flan_jax.tasks  # noqa: F401
from flan_jax.evaluation import evaluator as ev
from flan_jax.models import t5

CFG = t5.T5Config(vocab_size=2048, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=2,
                  num_decoder_layers=2, dtype="float32")
LENGTHS = {"inputs": 256, "targets": 64}


def _padded(d, lin, lt):
    return dataclasses.replace(d, inputs=np.pad(d.inputs, ((0, 0), (0, lin - d.inputs.shape[1]))),
                               targets=np.pad(d.targets, ((0, 0), (0, lt - d.targets.shape[1]))))


def test_trimmed_eval_equals_full_length_eval():
    evaluator = ev.Evaluator("flan_default_eval", LENGTHS, CFG, seen_base_tasks={"parity", "list_sort"},
                             examples_per_task=8, batch_size=4)
    params = t5.init_params(CFG, jax.random.PRNGKey(0))
    by_name = {d.name: d for d in evaluator.data}
    for name in ("parity_zs_opt", "list_sort_zs_noopt"):
        d = by_name[name]
        assert d.inputs.shape[1] < LENGTHS["inputs"] and d.inputs.shape[1] % 32 == 0
        assert (d.inputs[:, -1] == 0).any() or d.inputs.shape[1] == LENGTHS["inputs"]
        full = _padded(d, *LENGTHS.values())
        np.testing.assert_allclose(evaluator._teacher_forced_loss(params, d),
                                   evaluator._teacher_forced_loss(params, full), rtol=1e-5)
        if d.has_options:
            assert evaluator._rank_classify(params, d) == evaluator._rank_classify(params, full)
        else:  # greedy decoding over trimmed inputs for fewer steps is a prefix of the full-length decode
            short = np.asarray(evaluator._greedy(params, d.inputs[:4], max_decode_len=24))
            long = np.asarray(evaluator._greedy(params, full.inputs[:4], max_decode_len=64))
            np.testing.assert_array_equal(long[:, :24], short)
            assert len(evaluator._generate(params, d)) == len(d.inputs)


def _constant_model_favouring(tokens, vocab_size=CFG.vocab_size, favour=30.0):
    """Params whose next-token logits are `favour` on `tokens` and 0 elsewhere, at every position of every input.

    Every embedding row is the same vector, so every position of every sequence carries the same hidden state u
    through all layers (attention averages equal values); a first forward with an identity output projection reads u,
    and the output kernel u a^T / |u|^2 then gives logits a exactly.
    """
    params = t5.init_params(CFG, jax.random.PRNGKey(1))
    emb = params["token_embedder"]["embedding"]
    params["token_embedder"]["embedding"] = np.broadcast_to(np.asarray(emb[7]), emb.shape).copy()
    kernel = np.zeros((CFG.emb_dim, vocab_size), np.float32)
    kernel[:, :CFG.emb_dim] = np.eye(CFG.emb_dim)
    params["decoder"]["logits_dense"]["kernel"] = kernel
    probe = {"encoder_input_tokens": np.array([[5, 9, 1, 0], [11, 1, 0, 0]], np.int32),
             "decoder_input_tokens": np.array([[0, 4, 8], [0, 3, 0]], np.int32)}
    hidden = np.asarray(t5.forward(CFG, params, probe))[..., :CFG.emb_dim].reshape(-1, CFG.emb_dim)
    np.testing.assert_allclose(hidden, np.broadcast_to(hidden[0], hidden.shape), rtol=1e-4, atol=1e-5)
    u = hidden[0]
    a = np.zeros(vocab_size, np.float32)
    a[list(tokens)] = favour
    params["decoder"]["logits_dense"]["kernel"] = np.outer(u / np.dot(u, u), a).astype(np.float32)
    return params


ROW_OPTIONS = [["odd", "even", "five"], ["even", "odd"], ["yes", "no", "five", "even", "odd"], ["no", "odd", "even"],
               ["even", "yes", "odd"]]


def _hand_made_task(evaluator, name, targets, seen):
    """TaskEvalData with per-row option lists of different lengths (absent options must not win: they score 0)."""
    template = evaluator.data[0]
    vocab = evaluator.vocab
    rows = len(targets)
    inputs = np.zeros((rows, 32), np.int32)
    inputs[:, :3] = [5, 9, 1]
    target_tokens = np.zeros((rows, 8), np.int32)
    for i, t in enumerate(targets):
        ids = list(vocab.encode(t)) + [1]
        target_tokens[i, :len(ids)] = ids
    return ev.TaskEvalData(name, inputs, target_tokens, list(targets), [ROW_OPTIONS[i % 5] for i in range(rows)],
                           seen, template.task)


@pytest.fixture(scope="module")
def parity_evaluator():
    return ev.Evaluator("parity_zs_opt", LENGTHS, CFG, seen_base_tasks={"parity"}, examples_per_task=2, batch_size=2)


@pytest.mark.parametrize("favoured", ["odd", "even"])
def test_rank_classification_picks_the_most_likely_option(parity_evaluator, favoured):
    vocab = parity_evaluator.vocab
    favoured_ids = set(vocab.encode(favoured)) | {1}
    for word in {w for opts in ROW_OPTIONS for w in opts} - {favoured}:
        assert not set(vocab.encode(word)) <= favoured_ids, word  # every other option has an unlikely token
    params = _constant_model_favouring(favoured_ids)
    d = _hand_made_task(parity_evaluator, "hand_made", ["odd"] * 5, True)  # 5 rows, batch 2: a padded last batch
    assert parity_evaluator._rank_classify(params, d) == [favoured] * 5


def test_aggregates_group_tasks_as_declared(parity_evaluator):
    """mean_seen / mean_heldout average exactly the seen / held-out tasks, on accuracies the model fixes."""
    params = _constant_model_favouring(set(parity_evaluator.vocab.encode("odd")) | {1})
    hand = [("seen_all_right", ["odd"] * 4, True), ("seen_half_right", ["odd", "even"] * 2, True),
            ("heldout_quarter_right", ["odd", "even", "even", "even"], False)]
    evaluator = copy.copy(parity_evaluator)
    evaluator.data = [_hand_made_task(parity_evaluator, *spec) for spec in hand]
    results = evaluator.evaluate(params)
    accuracy = {name: values["accuracy"] for name, values in results.items()}
    assert accuracy == {"seen_all_right": 1.0, "seen_half_right": 0.5, "heldout_quarter_right": 0.25,
                        "mean_seen": 0.75, "mean_heldout": 0.25}
    assert results["mean_seen"]["loss"] == pytest.approx(
        (results["seen_all_right"]["loss"] + results["seen_half_right"]["loss"]) / 2)


def test_default_eval_tasks_are_seen_or_held_out_by_their_declared_cluster():
    from flan_jax.train import loop
    from flan_jax.tasks import default
    seen = loop.seen_base_tasks(default.TRAIN_MIXTURE)
    evaluator = ev.Evaluator(default.EVAL_MIXTURE, LENGTHS, CFG, seen_base_tasks=seen, examples_per_task=1)
    held_out = {name for name, spec in default.TASKS.items() if spec[0] in default.HELD_OUT_CLUSTERS}
    assert held_out and {ev.base_task_name(d.name) for d in evaluator.data if not d.seen} == held_out
    assert {ev.base_task_name(d.name) for d in evaluator.data if d.seen} == set(default.TASKS) - held_out
