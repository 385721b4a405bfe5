"""The decoder-only train step runs the output head on loss positions only (train/sparse_head.py): equal to
the full-logits loss and gradients on any batch, and chunks that no row reaches are really skipped."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax import models, packing
from flan_jax.train import loss as loss_lib, optim, sparse_head, step as step_lib

CONFIG = models.DecoderConfig(vocab_size=61, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                              mlp_dim=48)


def _hidden_batch(seed, rows=4, length=23, dim=8, vocab=17):
    """Random hidden states and targets; row 0 is all loss positions, row 1 has none, the rest are sparse."""
    rng = np.random.default_rng(seed)
    weights = (rng.random((rows, length)) < 0.3).astype(np.float32)
    weights[0], weights[1] = 1.0, 0.0
    targets = np.where(weights > 0, rng.integers(1, vocab, (rows, length)), 0).astype(np.int32)
    segments = np.where(np.arange(length)[None] < length // 2, 1, 2).astype(np.int32) * np.ones((rows, 1), np.int32)
    batch = {'decoder_target_tokens': jnp.asarray(targets), 'decoder_loss_weights': jnp.asarray(weights),
             'decoder_segment_ids': jnp.asarray(segments)}
    hidden = jnp.asarray(rng.normal(size=(rows, length, dim)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(dim, vocab)), jnp.float32)
    return hidden, kernel, batch


@pytest.mark.parametrize('normalizer', ['none', loss_lib.NUM_REAL_TARGET_TOKENS, loss_lib.AVERAGE_PER_SEQUENCE])
@pytest.mark.parametrize('chunk', [5, 23, 64])
def test_loss_and_gradients_equal_the_full_logits_path(normalizer, chunk):
    hidden, kernel, batch = _hidden_batch(0)
    options = dict(z_loss=1e-3, label_smoothing=0.1, normalizer=normalizer)

    def full(h, k):
        total, denom, aux = loss_lib.summed_loss(h @ k, batch, **options)
        return total / denom, aux

    def sparse(h, k):
        total, denom, aux = sparse_head.summed_loss_from_hidden(lambda x: x @ k, h, batch, chunk=chunk, **options)
        return total / denom, aux

    (want, want_aux), want_grads = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, kernel)
    (got, got_aux), got_grads = jax.jit(jax.value_and_grad(sparse, argnums=(0, 1), has_aux=True))(hidden, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for key in want_aux:
        np.testing.assert_allclose(got_aux[key], want_aux[key], rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(w))))
    assert float(got_aux['target_tokens']) == float(np.sum(batch['decoder_loss_weights'] > 0))


def test_chunks_beyond_the_busiest_row_are_not_computed():
    # Every row has exactly `chunk` loss positions; the hidden states elsewhere are NaN. If any later chunk ran its
    # head, NaN would reach the loss or the gradient.
    chunk, length = 4, 19
    hidden, kernel, batch = _hidden_batch(1, length=length)
    weights = np.zeros((4, length), np.float32)
    for row in range(4):
        weights[row, np.sort(np.random.default_rng(row).choice(length, chunk, replace=False))] = 1.0
    batch = {**batch, 'decoder_loss_weights': jnp.asarray(weights),
             'decoder_target_tokens': jnp.where(weights > 0, 3, 0).astype(jnp.int32)}
    hidden = jnp.where(jnp.asarray(weights)[..., None] > 0, hidden, jnp.nan)

    def sparse(k):
        total, denom, _ = sparse_head.summed_loss_from_hidden(lambda x: x @ k, hidden, batch, chunk=chunk)
        return total / denom

    value, grad = jax.jit(jax.value_and_grad(sparse))(kernel)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
    full = lambda k: loss_lib.summed_loss(jnp.nan_to_num(hidden) @ k, batch)[0] / float(weights.sum())
    np.testing.assert_allclose(value, full(kernel), rtol=1e-6)


def _packed_prefix_lm_batch(seed=0):
    rng = np.random.default_rng(seed)
    examples = [(rng.integers(2, 61, int(rng.integers(3, 12))).astype(np.int32),
                 rng.integers(2, 61, int(rng.integers(1, 5))).astype(np.int32)) for _ in range(24)]
    rows = list(packing.pack_examples(examples, (24, 8), concatenate=True))
    return {k: jnp.asarray(v) for k, v in packing.prefix_lm_feature_batch(rows[:4], 32).items()}


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_decoder_train_steps_with_and_without_the_sparse_head_agree(dtype):
    config = dataclasses.replace(CONFIG, dtype=dtype)
    batch = _packed_prefix_lm_batch()
    assert float(jnp.mean(batch['decoder_loss_weights'])) < 0.5   # mostly prompt positions: chunks get skipped
    optimizer = optim.make_adafactor(optim.AdafactorConfig(), optim.make_schedule(optim.ScheduleConfig()))
    results = []
    for head_chunk in (None, 8):
        step = jax.jit(step_lib.make_train_step(config, optimizer, step_lib.LossConfig(head_chunk=head_chunk)))
        state = step_lib.init_state(config, optimizer, jax.random.PRNGKey(0))
        for _ in range(2):
            state, metrics = step(state, batch)
        results.append((state['params'], metrics))
    (full_params, full_metrics), (sparse_params, sparse_metrics) = results
    tolerance = 1e-5 if dtype == 'float32' else 2e-2
    for key in ('loss', 'z_loss', 'token_accuracy', 'grad_norm'):
        np.testing.assert_allclose(sparse_metrics[key], full_metrics[key], rtol=tolerance)
    for got, want in zip(jax.tree.leaves(sparse_params), jax.tree.leaves(full_params)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tolerance,
                                   atol=tolerance * 1e-2)


def test_project_logits_of_hidden_states_is_forward():
    for config in (CONFIG, dataclasses.replace(CONFIG, tie_embeddings=True, dtype='bfloat16')):
        params = models.init_params(config, jax.random.PRNGKey(3))
        batch = _packed_prefix_lm_batch(1)
        want = models.forward(config, params, batch)
        got = models.project_logits(config, params, models.hidden_states(config, params, batch))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_head_closing_over_a_random_key_gets_the_full_paths_gradient():
    # A head with dropout closes over an integer PRNG key besides its float kernel: only the kernel is
    # differentiated, and the key's mask is the same in every chunk as in the full path.
    hidden, kernel, batch = _hidden_batch(2)
    key = jax.random.PRNGKey(7)

    def head(x, k):
        keep = jax.random.bernoulli(key, 0.8, k.shape)
        return x @ jnp.where(keep, k / 0.8, 0.0)

    full = lambda h, k: loss_lib.summed_loss(head(h, k), batch)[0]
    sparse = lambda h, k: sparse_head.summed_loss_from_hidden(lambda x: head(x, k), h, batch, chunk=3)[0]
    want, want_grads = jax.value_and_grad(full, argnums=(0, 1))(hidden, kernel)
    got, got_grads = jax.jit(jax.value_and_grad(sparse, argnums=(0, 1)))(hidden, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_a_non_positive_chunk_is_refused():
    hidden, kernel, batch = _hidden_batch(3)
    with pytest.raises(ValueError, match='chunk=0'):
        sparse_head.summed_loss_from_hidden(lambda x: x @ kernel, hidden, batch, chunk=0)
