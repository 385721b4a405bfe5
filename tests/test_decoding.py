"""KV-cache decoding agrees with step-by-step full forward passes; EOS, beams and sampling behave."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax.evaluation import scoring
from flan_jax.models import decoding, t5

CONFIG = t5.T5Config(vocab_size=61, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48, num_encoder_layers=2,
                     num_decoder_layers=2)
MAX_LEN = 7
EOS = 1


@pytest.fixture(scope='module')
def params():
    p = t5.init_params(CONFIG, jax.random.PRNGKey(0))
    # Make EOS the argmax at some (not all) steps so rows stop at different times.
    kernel = p['decoder']['logits_dense']['kernel']
    p['decoder']['logits_dense']['kernel'] = kernel.at[:, EOS].multiply(4.0)
    return p


@pytest.fixture(scope='module')
def inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, CONFIG.vocab_size, (6, 9)).astype(np.int32)
    for row, length in enumerate([9, 4, 6, 2, 8, 5]):   # EOS then padding
        tokens[row, length - 1] = EOS
        tokens[row, length:] = 0
    return tokens


def _reference_greedy(params, tokens):
    """No cache: rerun the full forward on the growing prefix; argmax at the newest position."""
    fwd = jax.jit(lambda p, b: t5.forward(CONFIG, p, b))
    out = np.zeros((tokens.shape[0], MAX_LEN), np.int32)
    done = np.zeros(tokens.shape[0], bool)
    for t in range(MAX_LEN):
        dec_in = np.zeros_like(out)
        dec_in[:, 1:] = out[:, :-1]
        logits = np.asarray(fwd(params, {'encoder_input_tokens': tokens, 'decoder_input_tokens': dec_in}))
        chosen = np.where(done, 0, logits[:, t].argmax(-1))
        out[:, t] = chosen
        done |= chosen == EOS
    return out


def test_greedy_cached_equals_uncached_argmax_and_eos_stops_rows(params, inputs):
    cached = np.asarray(decoding.greedy_decode(CONFIG, params, inputs, MAX_LEN))
    np.testing.assert_array_equal(cached, _reference_greedy(params, inputs))
    ended = (cached == EOS).any(axis=1)
    assert ended.any() and not ended.all(), cached   # the test covers both kinds of rows
    for row in cached[ended]:
        first = int(np.argmax(row == EOS))
        assert (row[first + 1:] == 0).all()
    assert (cached[~ended] != 0).all()


def test_decode_jits_inside_user_function(params, inputs):
    @jax.jit
    def run(p, x):
        return decoding.greedy_decode(CONFIG, p, x, MAX_LEN)
    np.testing.assert_array_equal(run(params, inputs), decoding.greedy_decode(CONFIG, params, inputs, MAX_LEN))


def test_beam_size_one_equals_greedy(params, inputs):
    greedy = decoding.greedy_decode(CONFIG, params, inputs, MAX_LEN)
    beam = decoding.beam_search(CONFIG, params, inputs, MAX_LEN, beam_size=1, length_penalty_alpha=0.0)
    np.testing.assert_array_equal(beam, greedy)


@pytest.mark.parametrize('alpha', [0.0, 0.6])
def test_beam_search_score_matches_rescored_sequence(params, inputs, alpha):
    seqs, scores = decoding.beam_search(CONFIG, params, inputs, MAX_LEN, beam_size=4, length_penalty_alpha=alpha,
                                        return_scores=True)
    seqs = np.asarray(seqs)
    batch = {'encoder_input_tokens': inputs, 'decoder_input_tokens': np.asarray(scoring.shift_right(seqs)),
             'decoder_target_tokens': seqs}
    logp = np.asarray(scoring.sequence_scores(CONFIG, params, batch))
    lengths = np.where((seqs == EOS).any(1), np.argmax(seqs == EOS, axis=1) + 1, MAX_LEN)
    np.testing.assert_allclose(scores, logp / decoding.brevity_penalty(lengths, alpha), rtol=1e-4, atol=1e-4)
    if alpha == 0.0:   # beam search should not lose to greedy on the same objective here
        greedy = np.asarray(decoding.greedy_decode(CONFIG, params, inputs, MAX_LEN))
        greedy_logp = np.asarray(scoring.sequence_scores(CONFIG, params, {
            'encoder_input_tokens': inputs, 'decoder_input_tokens': np.asarray(scoring.shift_right(greedy)),
            'decoder_target_tokens': greedy}))
        assert (logp >= greedy_logp - 1e-4).all()


def test_sampling_limits_equal_greedy(params, inputs):
    greedy = np.asarray(decoding.greedy_decode(CONFIG, params, inputs, MAX_LEN))
    rng = jax.random.PRNGKey(3)
    for kwargs in [dict(top_k=1), dict(temperature=1e-4), dict(top_p=1e-6)]:
        sampled = decoding.sample_decode(CONFIG, params, inputs, MAX_LEN, rng, **kwargs)
        np.testing.assert_array_equal(sampled, greedy, err_msg=str(kwargs))
    free = [np.asarray(decoding.sample_decode(CONFIG, params, inputs, MAX_LEN, jax.random.PRNGKey(s)))
            for s in range(2)]
    assert (free[0] != free[1]).any()


def test_self_instruct_sampling_draws_only_from_the_nucleus(params, inputs):
    """temperature 0.7 / top-p 0.5 (Self-Instruct's instruction sampling): every first token lies in the smallest set
    of tokens whose tempered probability reaches 0.5 (computed here in float64), and draws vary within it."""
    logits = np.asarray(t5.forward(CONFIG, params, {'encoder_input_tokens': inputs,
                                                    'decoder_input_tokens': np.zeros((len(inputs), 1), np.int32)}))
    logits = logits[:, 0].astype(np.float64) / 0.7
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1)
    mass_before = np.cumsum(np.take_along_axis(probs, order, -1), -1) - np.take_along_axis(probs, order, -1)
    nucleus = [set(order[r][mass_before[r] < 0.5].tolist()) for r in range(len(inputs))]
    firsts = np.stack([np.asarray(decoding.sample_decode(CONFIG, params, inputs, MAX_LEN, jax.random.PRNGKey(s),
                                                         temperature=0.7, top_p=0.5))[:, 0] for s in range(16)])
    for row in range(len(inputs)):
        assert set(firsts[:, row].tolist()) <= nucleus[row]
    assert any(len(set(firsts[:, r].tolist())) > 1 for r in range(len(inputs)) if len(nucleus[r]) > 1)


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.2, 0.1]]))
    kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
    assert kept(decoding.filter_logits(logits, top_k=2)) == [True, True, True, False]   # ties kept
    assert kept(decoding.filter_logits(logits, top_p=0.6)) == [True, True, True, False]
    assert kept(decoding.filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    np.testing.assert_allclose(decoding.filter_logits(logits, temperature=2.0), logits / 2.0)


def test_bad_arguments_raise():
    params = t5.init_params(CONFIG, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match='encoder_input_tokens'):
        decoding.greedy_decode(CONFIG, params, np.ones((4,), np.int32), MAX_LEN)
    with pytest.raises(ValueError, match='beam_size'):
        decoding.beam_search(CONFIG, params, np.ones((1, 4), np.int32), MAX_LEN, beam_size=40)
