"""Per-response scores through the model interface, for both families: sequence log-probs and final hidden states.

Responses come as [P, K, Lt] (K = 2: chosen, rejected), ending in EOS and right-padded with PAD_ID.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flan_jax import models
from flan_jax.data.vocabularies import PAD_ID
from flan_jax.models import lm_inputs
from flan_jax.train.preference import losses


def response_logprobs(config, params, inputs: jax.Array, responses: jax.Array) -> jax.Array:
    """log p(response | prompt) [P, K]; T5 encodes each prompt once for its K responses."""
    p, k, length = responses.shape
    logits = models.option_logits(config, params, inputs, responses)
    return losses.sequence_logprobs(logits, responses.reshape(p * k, length)).reshape(p, k)


def response_hidden_states(config, params, inputs: jax.Array, responses: jax.Array, *, dropout_rng=None):
    """Final hidden states [P*K, Lt, D] at the response positions (position t predicts token t)."""
    p, k, length = responses.shape
    rows = responses.reshape(p * k, length)
    prompts = jnp.repeat(inputs, k, axis=0)
    if models.is_encoder_decoder(config):
        batch = {"encoder_input_tokens": prompts, "decoder_input_tokens": models.shift_right(rows)}
        return models.hidden_states(config, params, batch, dropout_rng=dropout_rng)
    features = lm_inputs.prompt_and_targets(prompts, rows)
    hidden = models.hidden_states(config, params, features, dropout_rng=dropout_rng)
    return lm_inputs.target_part(hidden, features, length)


def eos_positions(responses_flat: jax.Array) -> jax.Array:
    """[N] index of each response's last real token (its EOS): the position that has read the whole response."""
    return jnp.maximum(jnp.sum(responses_flat != PAD_ID, axis=-1) - 1, 0)
