"""The model interface: every family is a frozen config type plus one `Family` record of plain functions.

train/, evaluation/, checkpoints/ and the benchmarks call the functions in flan_jax.models (which dispatch on the
config's type) and never a family module, so a new family is one `Family` entry here.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from flan_jax.models import decoder, peft, t5, t5_cache
from flan_jax.models import lm_inputs
from flan_jax import packing


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_type: type
    init_params: Callable          # (config, rng) -> params
    param_logical_axes: Callable   # (config) -> tree of logical axis-name tuples
    param_shapes: Callable         # (config) -> tree of ShapeDtypeStruct
    count_params: Callable         # (config) -> int
    forward: Callable              # (config, params, batch, *, dropout_rng=None) -> logits [B, L, vocab] float32
    flops_per_example: Callable    # (config, inputs_len, targets_len) -> forward FLOPs
    option_logits: Callable        # (config, params, inputs [B, Lin], options [B, K, Lt]) -> logits [B*K, Lt, V]
    decode_start: Callable         # (config, params, inputs, rows_per_input, max_len) -> (logits, fixed, cache)
    decode_step: Callable          # (config, params, tokens, index, fixed, cache, rows_per_input) -> (logits, cache)
    feature_converter: Callable    # (**packing options) -> seqio.FeatureConverter the family trains on
    encoder_decoder: bool          # batches carry encoder_* features
    hidden_states: Callable        # (config, params, batch, *, dropout_rng=None) -> [B, L, emb_dim] float32
    project_logits: Callable       # (config, params, hidden [..., emb_dim], *, dropout_rng=None) -> float32 logits


def shift_right(targets: jax.Array) -> jax.Array:
    """Decoder inputs for unpacked targets: 0 first, then targets[:-1] (along the last axis)."""
    pad = [(0, 0)] * (targets.ndim - 1) + [(1, 0)]
    return jnp.pad(targets, pad)[..., :-1]


def _t5_option_logits(config, params, inputs, options):
    """Encoder once per input; the K option rows share its output (and cross-attention K/V)."""
    batch, num_options, length = options.shape
    encoded = t5.encode(config, params, {'encoder_input_tokens': inputs})
    decoder_batch = {'encoder_input_tokens': inputs,
                     'decoder_input_tokens': shift_right(options.reshape(batch * num_options, length))}
    return t5.decode(config, params, encoded, decoder_batch, decoder_rows_per_input=num_options)


def _decoder_option_logits(config, params, inputs, options):
    """Each option row is BOS ++ inputs ++ option laid out as one prefix-LM segment; logits of the option part."""
    batch, num_options, length = options.shape
    features = lm_inputs.prompt_and_targets(jnp.repeat(inputs, num_options, axis=0),
                                            options.reshape(batch * num_options, length))
    logits = decoder.forward(config, params, features)
    return lm_inputs.target_part(logits, features, length)


def _peft_aware(fn: Callable, prompt_slots: Optional[str] = None, encoder_decoder: bool = True) -> Callable:
    """fn(config, params, x, ...) run on peft.view(params) when config.peft is set (else called as it is). Prompt
    tuning: prompt_slots='inputs' puts the slots before raw inputs x; 'batch' before the inputs of an unpacked batch
    x (packed batches already have them, from models.feature_converter), dropping their logits again."""
    @functools.wraps(fn)
    def wrapped(config, params, x, *args, **kwargs):
        if getattr(config, 'peft', None) is None:
            if 'peft' in params:
                raise ValueError("params have a 'peft' subtree but the model config has peft=None (set the config's "
                                 'peft, or models.merge_peft first)')
            return fn(config, params, x, *args, **kwargs)
        viewed = peft.view(config, params, kwargs.get('dropout_rng'))
        if prompt_slots == 'inputs':
            return fn(config, viewed, peft.reserve_prompt_slots(config, x), *args, **kwargs)
        if prompt_slots == 'batch':
            x, extra_positions = peft.reserve_prompt_slots_in_batch(config, x, encoder_decoder)
            return fn(config, viewed, x, *args, **kwargs)[:, extra_positions:]
        return fn(config, viewed, x, *args, **kwargs)
    return wrapped


def _family(name, config_type, module, option_logits, decode_start, decode_step, converter, encoder_decoder,
            hidden_states, project_logits):
    return Family(name, config_type, module.init_params, module.param_logical_axes, module.param_shapes,
                  module.count_params, _peft_aware(module.forward, 'batch', encoder_decoder),
                  module.count_flops_per_example, _peft_aware(option_logits, 'inputs'),
                  _peft_aware(decode_start, 'inputs'), _peft_aware(decode_step), converter, encoder_decoder,
                  _peft_aware(hidden_states, 'batch', encoder_decoder), _peft_aware(project_logits))


def _t5_hidden_states(config, params, batch, *, dropout_rng=None):
    """Decoder hidden states (after decoder_norm): what logits_dense projects, one row per target position."""
    encoded = t5.encode(config, params, batch, dropout_rng=dropout_rng)
    return t5.decode_hidden(config, params, encoded, batch, dropout_rng=dropout_rng).astype(jnp.float32)


def _decoder_hidden_states(config, params, batch, *, dropout_rng=None):
    return decoder.hidden_states(config, params, batch, dropout_rng=dropout_rng).astype(jnp.float32)


def _t5_project_logits(config, params, hidden, *, dropout_rng=None):
    del config, dropout_rng  # the head has no dropout of its own
    return t5.output_logits(params, hidden)


def _decoder_project_logits(config, params, hidden, *, dropout_rng=None):
    del dropout_rng
    # hidden_states widened the compute-dtype states to float32; narrowing back is exact, so this equals forward.
    return decoder.project_logits(params, hidden.astype(config.dtype), config)


def _t5_converter(**options):
    return packing.PackedEncDecFeatureConverter(**options)


def _decoder_converter(**options):
    return packing.PackedPrefixLMFeatureConverter(**options)


# forward, option_logits and the decoding hooks honour params['peft'] (see _peft_aware); the param functions give the
# base tree only (flan_jax.models adds the 'peft' subtree).
T5 = _family('t5', t5.T5Config, t5, _t5_option_logits, t5_cache.decode_start, t5_cache.decode_step, _t5_converter,
             encoder_decoder=True, hidden_states=_t5_hidden_states, project_logits=_t5_project_logits)
DECODER = _family('decoder', decoder.DecoderConfig, decoder, _decoder_option_logits, decoder.decode_start,
                  decoder.decode_step, _decoder_converter, encoder_decoder=False,
                  hidden_states=_decoder_hidden_states, project_logits=_decoder_project_logits)
FAMILIES = (T5, DECODER)


def family(config: Any) -> Family:
    for fam in FAMILIES:
        if isinstance(config, fam.config_type):
            return fam
    raise TypeError(f'no model family for config of type {type(config).__name__}; known: '
                    f'{[f.config_type.__name__ for f in FAMILIES]}')


def family_by_name(name: str) -> Family:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise ValueError(f'unknown model family {name!r}; known: {[f.name for f in FAMILIES]}')
