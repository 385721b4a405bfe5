"""Evaluator: results do not depend on how far inputs, targets and options are padded (eval runs trimmed shapes)."""
import dataclasses

import jax
import numpy as np

import tasks  # noqa: F401
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
