"""Packed decoder-only / prefix-LM rows: loss equals the unpacked per-example sum, segments do not interact."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax import models, packing
from flan_jax.train import loss as loss_lib

CONFIG = models.DecoderConfig(vocab_size=53, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                              mlp_dim=48, rope_theta=10000.0)
LENGTH = 40


def _examples(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(5, 3), (7, 4), (2, 6), (6, 2)]
    return [(rng.integers(2, 53, i).astype(np.int32), rng.integers(2, 53, t).astype(np.int32)) for i, t in sizes]


def _summed_loss(config, params, features):
    batch = {k: jnp.asarray(v) for k, v in features.items()}
    logits = models.forward(config, params, batch)
    total, _, _ = loss_lib.summed_loss(logits, batch, normalizer='none')
    return float(total), np.asarray(logits)


@pytest.mark.parametrize('prefix_lm', [True, False])
def test_packed_loss_equals_sum_of_unpacked(prefix_lm):
    config = dataclasses.replace(CONFIG, prefix_lm=prefix_lm)
    params = models.init_params(config, jax.random.PRNGKey(0))
    examples = _examples()
    packed = packing.prefix_lm_feature_batch([examples], LENGTH)
    assert packed['decoder_segment_ids'].max() == len(examples)
    packed_total, _ = _summed_loss(config, params, packed)
    singles = [_summed_loss(config, params, packing.prefix_lm_feature_batch([[ex]], 16))[0] for ex in examples]
    np.testing.assert_allclose(packed_total, sum(singles), rtol=1e-5)
    # the loss covers targets only: 15 target tokens in all
    assert packed['decoder_loss_weights'].sum() == sum(len(t) for _, t in examples)


def test_prefix_is_bidirectional_and_causal_mode_is_not():
    params = models.init_params(CONFIG, jax.random.PRNGKey(1))
    ex = _examples()[:1]
    base = packing.prefix_lm_feature_batch([ex], 16)
    changed = {k: v.copy() for k, v in base.items()}
    changed['decoder_input_tokens'][0, 4] = 9   # a later input token (still inside the prefix)
    for config, first_position_changes in ((CONFIG, True), (dataclasses.replace(CONFIG, prefix_lm=False), False)):
        a = _summed_loss(config, params, base)[1][0, 1]
        b = _summed_loss(config, params, changed)[1][0, 1]
        assert (np.max(np.abs(a - b)) > 1e-4) == first_position_changes


def test_changing_one_packed_example_leaves_neighbours_unchanged():
    params = models.init_params(CONFIG, jax.random.PRNGKey(2))
    examples = _examples()
    other = list(examples)
    other[1] = (np.full(7, 11, np.int32), np.full(4, 12, np.int32))
    before = packing.prefix_lm_feature_batch([examples], LENGTH)
    after = packing.prefix_lm_feature_batch([other], LENGTH)
    _, logits_before = _summed_loss(CONFIG, params, before)
    _, logits_after = _summed_loss(CONFIG, params, after)
    seg = before['decoder_segment_ids'][0]
    neighbours = (seg > 0) & (seg != 2)
    np.testing.assert_allclose(logits_before[0, neighbours], logits_after[0, neighbours], atol=1e-6)
    assert np.max(np.abs(logits_before[0, seg == 2] - logits_after[0, seg == 2])) > 1e-3


def test_option_scores_equal_the_prefix_lm_training_layout():
    """Rank classification of a decoder scores each option as the targets of its own prefix-LM segment."""
    from flan_jax.evaluation import scoring
    params = models.init_params(CONFIG, jax.random.PRNGKey(3))
    inputs = np.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]], np.int32)
    options = np.array([[[10, 1, 0], [11, 12, 1]], [[13, 1, 0], [14, 1, 0]]], np.int32)
    scores = np.asarray(scoring.rank_classification_scores(CONFIG, params, inputs, options))
    for b in range(2):
        for k in range(2):
            ex = (inputs[b][inputs[b] != 0], options[b, k][options[b, k] != 0])
            features = packing.prefix_lm_feature_batch([[ex]], 8)
            batch = {key: jnp.asarray(v) for key, v in features.items()}
            log_probs = scoring.token_log_probs(models.forward(CONFIG, params, batch), batch['decoder_target_tokens'])
            want = float(jnp.sum(log_probs * batch['decoder_loss_weights']))
            np.testing.assert_allclose(scores[b, k], want, rtol=1e-5)


def test_prefix_lm_kv_cache_greedy_equals_full_forward_argmax():
    """Cached decoding (left-aligned prompts, bidirectional prefix) picks what a full forward over the same
    prefix-LM row would pick at every step."""
    from flan_jax.models import decoding, lm_inputs
    params = models.init_params(CONFIG, jax.random.PRNGKey(4))
    inputs = np.array([[5, 6, 7, 8, 1], [9, 1, 0, 0, 0]], np.int32)
    steps = 5
    got = np.asarray(decoding.greedy_decode(CONFIG, params, jnp.asarray(inputs), steps, eos_id=1))
    generated = np.zeros((2, steps), np.int32)
    for t in range(steps):
        features = lm_inputs.prompt_and_targets(jnp.asarray(inputs), jnp.asarray(generated))
        logits = lm_inputs.target_part(models.forward(CONFIG, params, features), features, steps)
        generated[:, t] = np.argmax(np.asarray(logits[:, t]), axis=-1)
    after_eos = np.cumsum(np.cumsum(generated == 1, axis=1), axis=1) > 1
    np.testing.assert_array_equal(got, np.where(after_eos, 0, generated))
