"""Scoring: rank classification (encode once) agrees with the naive per-option path and sequence_scores."""
import jax
import numpy as np
import pytest

from flan_jax.evaluation import scoring
from flan_jax.models import t5

CONFIG = t5.T5Config(vocab_size=61, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48, num_encoder_layers=2,
                     num_decoder_layers=2)


@pytest.fixture(scope='module')
def params():
    return t5.init_params(CONFIG, jax.random.PRNGKey(0))


def _padded(rows, length):
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


@pytest.fixture(scope='module')
def problem():
    """3 inputs x 4 options of different lengths, each ending in EOS; row 2 has only 3 options."""
    rng = np.random.default_rng(0)
    inputs = _padded([list(rng.integers(3, 61, n)) + [1] for n in (7, 3, 5)], 10)
    options = np.zeros((3, 4, 6), np.int32)
    for b in range(3):
        for k in range(4 if b != 2 else 3):
            n = int(rng.integers(1, 6))
            options[b, k, :n] = list(rng.integers(3, 61, n - 1)) + [1]
    return inputs, options


def test_rank_classification_equals_naive_and_sequence_scores(params, problem):
    inputs, options = problem
    fast = np.asarray(scoring.rank_classification_scores(CONFIG, params, inputs, options))
    naive = np.asarray(scoring.rank_classification_scores_naive(CONFIG, params, inputs, options))
    assert fast.shape == (3, 4)
    np.testing.assert_allclose(fast, naive, rtol=1e-5, atol=1e-5)

    # Score every (input, option) pair as an ordinary unpacked batch, built by hand.
    for b in range(3):
        for k in range(4):
            targets = options[b, k][None]
            dec_in = np.zeros_like(targets)
            dec_in[0, 1:] = targets[0, :-1]
            batch = {'encoder_input_tokens': inputs[b][None], 'decoder_input_tokens': dec_in,
                     'decoder_target_tokens': targets, 'decoder_loss_weights': (targets != 0).astype(np.float32)}
            expected = float(scoring.sequence_scores(CONFIG, params, batch)[0])
            np.testing.assert_allclose(fast[b, k], expected, rtol=1e-5, atol=1e-5)
    assert fast[2, 3] == 0.0                 # absent option (all zeros) contributes nothing
    assert (fast[:, :3] < 0).all()           # real options have log-likelihood < 0


def test_sequence_scores_follow_loss_weights(params, problem):
    inputs, options = problem
    targets = options[:, 0]
    batch = {'encoder_input_tokens': inputs, 'decoder_input_tokens': np.asarray(scoring.shift_right(targets)),
             'decoder_target_tokens': targets}
    default = np.asarray(scoring.sequence_scores(CONFIG, params, batch))
    halved = np.asarray(scoring.sequence_scores(CONFIG, params, {
        **batch, 'decoder_loss_weights': 0.5 * (targets != 0).astype(np.float32)}))
    np.testing.assert_allclose(halved, 0.5 * default, rtol=1e-6)
    logits = jax.jit(t5.forward, static_argnums=0)(CONFIG, params, batch)
    logp = np.asarray(jax.nn.log_softmax(logits))
    manual = [sum(logp[b, t, targets[b, t]] for t in range(targets.shape[1]) if targets[b, t]) for b in range(3)]
    np.testing.assert_allclose(default, manual, rtol=1e-5)


def test_shift_right_and_shape_errors(params):
    np.testing.assert_array_equal(scoring.shift_right(np.array([[5, 6, 1, 0]])), [[0, 5, 6, 1]])
    with pytest.raises(ValueError, match='option_target_tokens'):
        scoring.rank_classification_scores(CONFIG, params, np.ones((2, 5), np.int32), np.ones((2, 5), np.int32))
    with pytest.raises(ValueError, match='batch sizes differ'):
        scoring.rank_classification_scores(CONFIG, params, np.ones((2, 5), np.int32), np.ones((3, 2, 5), np.int32))
