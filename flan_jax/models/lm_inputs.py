"""Decoder-only batches from (inputs, targets) arrays, laid out as seqio's PrefixLM converter does one segment.

decoder_target_tokens = inputs ++ targets (padding removed between them), decoder_input_tokens = that shifted right
with BOS 0, decoder_causal_attention = 1 on the inputs plus one position (T5X's PrefixLM feature names).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def prompt_and_targets(inputs: jax.Array, targets: jax.Array) -> dict:
    """Right-padded inputs [N, Lin] and targets [N, Lt] (0 = padding) -> one prefix-LM row [N, Lin + Lt] each."""
    n = jnp.sum(inputs != 0, axis=1, keepdims=True)
    length = inputs.shape[1] + targets.shape[1]
    slots = jnp.arange(length)[None]
    from_inputs = jnp.take_along_axis(inputs, jnp.clip(slots, 0, inputs.shape[1] - 1), axis=1)
    target_index = slots - n
    from_targets = jnp.take_along_axis(targets, jnp.clip(target_index, 0, targets.shape[1] - 1), axis=1)
    in_targets = (target_index >= 0) & (target_index < targets.shape[1])
    row = jnp.where(slots < n, from_inputs, jnp.where(in_targets, from_targets, 0)).astype(jnp.int32)
    shifted = jnp.pad(row, ((0, 0), (1, 0)))[:, :-1]
    return {'decoder_target_tokens': row, 'decoder_input_tokens': shifted,
            'decoder_causal_attention': (slots <= n).astype(jnp.int32),
            'decoder_loss_weights': (in_targets & (row != 0)).astype(jnp.int32),
            'prompt_length': n[:, 0]}


def target_part(values: jax.Array, features: dict, target_len: int) -> jax.Array:
    """The [N, Lt, ...] slice of per-position values [N, Lin + Lt, ...] that predicts the targets."""
    index = features['prompt_length'][:, None] + jnp.arange(target_len)[None]
    index = jnp.clip(index, 0, values.shape[1] - 1)
    return jnp.take_along_axis(values, index.reshape(index.shape + (1,) * (values.ndim - 2)), axis=1)
