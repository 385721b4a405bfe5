"""models.hidden_states: the final hidden states that forward's logits are a projection of, for both families."""
import jax
import numpy as np
import pytest

from flan_jax import models

T5_CFG = models.T5Config(vocab_size=40, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24, num_encoder_layers=1,
                         num_decoder_layers=2)
DEC_CFG = models.DecoderConfig(vocab_size=40, emb_dim=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                               mlp_dim=24)


def _output_kernel(config, params):
    if isinstance(config, models.T5Config):
        return params['decoder']['logits_dense']['kernel']
    if config.tie_embeddings:
        return params['token_embedder']['embedding'].T
    return params['logits_dense']['kernel']


def _batch(config):
    targets = np.array([[9, 3, 1, 0], [4, 5, 6, 1]], np.int32)
    if isinstance(config, models.T5Config):
        return {'encoder_input_tokens': np.array([[5, 6, 7, 1], [8, 1, 0, 0]], np.int32),
                'decoder_input_tokens': np.asarray(models.shift_right(targets)), 'decoder_target_tokens': targets}
    return {'decoder_input_tokens': np.asarray(models.shift_right(targets)), 'decoder_target_tokens': targets,
            'decoder_causal_attention': np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.int32)}


@pytest.mark.parametrize('config', [T5_CFG, DEC_CFG, DEC_CFG.__class__(**{**DEC_CFG.__dict__, 'tie_embeddings': True,
                                                                           'scale_embeddings': True})],
                         ids=['t5', 'decoder', 'decoder_tied'])
def test_hidden_states_times_output_projection_are_the_logits(config):
    params = models.init_params(config, jax.random.PRNGKey(1))
    batch = _batch(config)
    hidden = models.hidden_states(config, params, batch)
    assert hidden.shape == (2, 4, config.emb_dim) and hidden.dtype == np.float32
    logits = models.forward(config, params, batch)
    np.testing.assert_allclose(np.asarray(hidden @ _output_kernel(config, params)), np.asarray(logits),
                               rtol=1e-5, atol=1e-5)
    # After the final RMSNorm (scale 1 at init for these configs): each row has unit root-mean-square.
    if not getattr(config, 'norm_plus_one', False):
        np.testing.assert_allclose(np.sqrt(np.mean(np.square(np.asarray(hidden)), -1)), 1.0, rtol=1e-3)


def test_hidden_states_depend_on_the_prompt():
    params = models.init_params(T5_CFG, jax.random.PRNGKey(1))
    batch = _batch(T5_CFG)
    other = dict(batch, encoder_input_tokens=np.array([[11, 12, 13, 1], [8, 1, 0, 0]], np.int32))
    first, second = models.hidden_states(T5_CFG, params, batch), models.hidden_states(T5_CFG, params, other)
    assert not np.allclose(first[0], second[0]) and np.allclose(first[1], second[1], atol=1e-6)
