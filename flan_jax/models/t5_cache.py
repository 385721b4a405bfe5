"""KV-cache decoding hooks for the T5 encoder-decoder (used through flan_jax.models.decoding).

The encoder runs once; cross-attention K/V are projected once per layer; decoder self-attention keys and values go
into a pre-allocated cache [rows, max_decode_len + 1, heads * head_dim] per layer, one position per step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flan_jax.models import layers
from flan_jax.models import peft as peft_lib
from flan_jax.models import t5


def _step_at(config: t5.T5Config, params, tokens, position, fixed, cache, rows_per_input: int):
    """Logits [N, vocab] for tokens [N] at decoder position `position`; returns (logits, updated cache)."""
    cross_kv, cross_mask, self_bias = fixed['cross_kv'], fixed['cross_mask'], fixed['self_bias']
    no_dropout = layers.Dropout(None, 0.0)
    rows = tokens.shape[0]
    max_len = cache['key'][0].shape[1]
    y = t5.embed(params, tokens[:, None], config)                                  # [N, 1, d]
    bias = jax.lax.dynamic_slice_in_dim(self_bias, position, 1, axis=1)[None]     # [1, h, 1, L]
    mask = (jnp.arange(max_len) <= position)[None, None, None, :]
    new_cache = {'key': [], 'value': []}
    for i in range(config.num_decoder_layers):
        p = params['decoder'][f'layers_{i}']
        z = t5.rms_norm(y, p['pre_self_attention_layer_norm']['scale'], config)
        k, v = t5.project_kv(p['self_attention'], z, config)
        k_cache = jax.lax.dynamic_update_slice(cache['key'][i], k.reshape(rows, 1, -1), (0, position, 0))
        v_cache = jax.lax.dynamic_update_slice(cache['value'][i], v.reshape(rows, 1, -1), (0, position, 0))
        new_cache['key'].append(k_cache)
        new_cache['value'].append(v_cache)
        shape = (rows, max_len, config.num_heads, config.head_dim)
        attended = t5.attend(p['self_attention'], z, k_cache.reshape(shape), v_cache.reshape(shape), mask, bias,
                             config, no_dropout)
        y = y + peft_lib.adapter(p.get('adapter_attention'), attended)
        z = t5.rms_norm(y, p['pre_cross_attention_layer_norm']['scale'], config)
        grouped = z.reshape((rows // rows_per_input, rows_per_input, z.shape[-1]))
        cross = t5.attend(p['encoder_decoder_attention'], grouped, *cross_kv[i], cross_mask, None, config,
                          no_dropout)
        y = y + cross.reshape(z.shape)
        z = t5.rms_norm(y, p['pre_mlp_layer_norm']['scale'], config)
        y = y + peft_lib.adapter(p.get('adapter_mlp'), t5.gated_mlp(p['mlp'], z, config, no_dropout))
    y = t5.rms_norm(y, params['decoder']['decoder_norm']['scale'], config)
    return t5.output_logits(params, y)[:, 0], new_cache


def decode_start(config: t5.T5Config, params, encoder_input_tokens: jax.Array, rows_per_input: int,
                 max_decode_len: int):
    """Encodes, builds the cross K/V and an empty cache, feeds BOS; returns (first logits, fixed state, cache)."""
    encoded = t5.encode(config, params, {'encoder_input_tokens': encoder_input_tokens})
    layers = [params['decoder'][f'layers_{i}'] for i in range(config.num_decoder_layers)]
    positions = np.arange(max_decode_len + 1, dtype=np.int32)   # one spare slot for the token after the last
    fixed = {'cross_kv': [t5.project_kv(p['encoder_decoder_attention'], encoded, config) for p in layers],
             'cross_mask': (encoder_input_tokens != 0)[:, None, None, :],
             'self_bias': t5.relative_position_bias(params['decoder']['relpos_bias']['rel_embedding'], positions,
                                                    positions, False, config)}
    rows = encoder_input_tokens.shape[0] * rows_per_input
    empty = jnp.zeros((rows, max_decode_len + 1, config.joined_kv), config.dtype)
    cache = {'key': [empty] * config.num_decoder_layers, 'value': [empty] * config.num_decoder_layers}
    bos = jnp.zeros((rows,), jnp.int32)
    logits, cache = _step_at(config, params, bos, 0, fixed, cache, rows_per_input)
    return logits, fixed, cache


def decode_step(config: t5.T5Config, params, tokens: jax.Array, index, fixed, cache, rows_per_input: int):
    """Logits after feeding new token number `index` (decoder position index + 1)."""
    return _step_at(config, params, tokens, index + 1, fixed, cache, rows_per_input)
