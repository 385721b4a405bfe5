"""Sequence log-likelihood scoring and rank classification for the T5 model.

`sequence_scores` follows T5X's "score" semantics: sum over target positions of
log p(target token) * decoder_loss_weights. `rank_classification_scores` scores K options per input
while running the encoder once per input; the K option rows share their input's encoder output
(and cross-attention K/V) instead of repeating it.
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp

from flan_jax import models
from flan_jax.data.vocabularies import PAD_ID


shift_right = models.shift_right


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) per position from float logits [..., L, V] and int targets [..., L]."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


@functools.partial(jax.jit, static_argnames=('config',))
def sequence_scores(config, params, batch: Mapping[str, jax.Array]) -> jax.Array:
    """[B] sum of log p(decoder_target_tokens) * decoder_loss_weights (weights default: target != PAD_ID).

    The batch is a seqio EncDecFeatureConverter batch; scores are per row, so use unpacked batches.
    """
    for key in ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens'):
        if key not in batch:
            raise KeyError(f'sequence_scores: batch is missing feature {key!r} (has {sorted(batch)})')
    targets = batch['decoder_target_tokens']
    weights = batch.get('decoder_loss_weights')
    weights = (targets != PAD_ID) if weights is None else weights
    logits = models.forward(config, params, batch)
    return jnp.sum(token_log_probs(logits, targets) * weights.astype(jnp.float32), axis=-1)


def _check_options(encoder_input_tokens, option_target_tokens):
    if encoder_input_tokens.ndim != 2 or option_target_tokens.ndim != 3:
        raise ValueError('rank classification expects encoder_input_tokens [B, Lin] and option_target_tokens '
                         f'[B, K, Lt]; got {encoder_input_tokens.shape} and {option_target_tokens.shape}')
    if encoder_input_tokens.shape[0] != option_target_tokens.shape[0]:
        raise ValueError(f'rank classification: batch sizes differ: inputs {encoder_input_tokens.shape[0]}, '
                         f'options {option_target_tokens.shape[0]}')


@functools.partial(jax.jit, static_argnames=('config',))
def rank_classification_scores(config, params, encoder_input_tokens: jax.Array,
                               option_target_tokens: jax.Array) -> jax.Array:
    """[B, K] log-likelihood of each option given its input; encoder runs once per input.

    option_target_tokens: [B, K, Lt], each option ends with EOS and is padded with PAD_ID; all-padding rows
    (absent options) score 0, so mask them before taking the argmax.
    """
    _check_options(encoder_input_tokens, option_target_tokens)
    batch, num_options, length = option_target_tokens.shape
    targets = option_target_tokens.reshape(batch * num_options, length)
    logits = models.option_logits(config, params, encoder_input_tokens, option_target_tokens)
    scores = jnp.sum(token_log_probs(logits, targets) * (targets != PAD_ID), axis=-1)
    return scores.reshape(batch, num_options)


@functools.partial(jax.jit, static_argnames=('config',))
def rank_classification_scores_naive(config, params, encoder_input_tokens: jax.Array,
                                     option_target_tokens: jax.Array) -> jax.Array:
    """Baseline: every (input, option) pair is its own example, so the encoder runs K times per input."""
    _check_options(encoder_input_tokens, option_target_tokens)
    batch, num_options, length = option_target_tokens.shape
    targets = option_target_tokens.reshape(batch * num_options, length)
    pairs = {'encoder_input_tokens': jnp.repeat(encoder_input_tokens, num_options, axis=0),
             'decoder_input_tokens': shift_right(targets), 'decoder_target_tokens': targets}
    return sequence_scores(config, params, pairs).reshape(batch, num_options)
