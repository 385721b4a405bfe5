"""Model interface: functions that dispatch on the config's type (see base.py); import families only here.

With `config.peft` set (a PeftConfig, models/peft.py) the parameter tree is the base tree plus one top-level key
'peft' holding every new parameter; the functions below include it, and forward / option_logits / decoding use it.
"""
import dataclasses

import jax

from flan_jax.models import peft as _peft
from flan_jax.models import span_attention as _span_attention
from flan_jax.models.base import FAMILIES, Family, family, family_by_name, shift_right  # noqa: F401
from flan_jax.models.decoder import DecoderConfig  # noqa: F401
from flan_jax.models.peft import PeftConfig, load_prompt  # noqa: F401
from flan_jax.models.t5 import T5Config  # noqa: F401

# The PEFT init draws from fold_in(rng, this) so the base params are the same with and without PEFT.
_PEFT_RNG_SALT = 0x9EF7


def _base(config):
    fam = family(config)
    return fam, fam.param_shapes(config), fam.param_logical_axes(config)


def init_params(config, rng):
    fam, shapes, axes = _base(config)
    params = fam.init_params(config, rng)
    if getattr(config, 'peft', None) is None:
        return params
    return {**params, 'peft': _peft.init(config, jax.random.fold_in(rng, _PEFT_RNG_SALT), shapes, axes)}


def init_peft(config, rng, base_params, *, label_token_ids=None):
    """The 'peft' subtree for `base_params`: fresh PEFT parameters, the prompt (prompt tuning) sampled from the first
    5,000 vocabulary embeddings, or the class labels' embeddings (label_token_ids: one id sequence per label) first.
    A prompt saved to a file: params['peft']['prompt'] = models.load_prompt(path, config)."""
    if getattr(config, 'peft', None) is None:
        raise ValueError('init_peft: the model config has peft=None; set it to a models.PeftConfig')
    _, shapes, axes = _base(config)
    init_rng, prompt_rng = jax.random.split(rng)
    fresh = _peft.init(config, init_rng, shapes, axes)
    return _peft.init_from_base(config, prompt_rng, fresh, base_params, label_token_ids)


def param_logical_axes(config):
    _, shapes, axes = _base(config)
    if getattr(config, 'peft', None) is None:
        return axes
    return {**axes, 'peft': _peft.logical_axes(config, shapes, axes)}


def param_shapes(config):
    _, shapes, axes = _base(config)
    if getattr(config, 'peft', None) is None:
        return shapes
    return {**shapes, 'peft': _peft.shapes(config, shapes, axes)}


def count_params(config) -> int:
    """All parameters (base + PEFT); count_peft_params is the trainable part under PEFT."""
    return family(config).count_params(config) + count_peft_params(config)


def count_peft_params(config) -> int:
    if getattr(config, 'peft', None) is None:
        return 0
    _, shapes, axes = _base(config)
    return _peft.count(config, shapes, axes)


def merge_peft(config, params):
    """(base config, base params) with LoRA merged into the kernels; a ValueError for methods that cannot merge."""
    return _peft.merge(config, params)


def fold_peft(config, params):
    """(config, params) with a prefix MLP reparameterization replaced by its output (the prefix stays PEFT)."""
    return _peft.fold(config, params)


def forward(config, params, batch, *, dropout_rng=None):
    """Logits [B, L, vocab] (float32) for a batch in the family's feature names (EncDec or PrefixLM).

    Prompt tuning: packed batches must come from feature_converter(config) (its packer reserves the prompt slots in
    every segment); unpacked ones (no segment ids) get the slots inserted here."""
    return family(config).forward(config, params, batch, dropout_rng=dropout_rng)


def hidden_states(config, params, batch, *, dropout_rng=None):
    """Final hidden states [B, L, emb_dim] (float32) after the final norm, before the output projection: for T5 the
    decoder's (one per target position), for decoder-only the stack's; forward's logits are these projected."""
    return family(config).hidden_states(config, params, batch, dropout_rng=dropout_rng)


def project_logits(config, params, hidden, *, dropout_rng=None):
    """The output head (float32 logits) on hidden_states' output, or on any gathered subset of its positions:
    project_logits(c, p, hidden_states(c, p, batch)) equals forward(c, p, batch)."""
    return family(config).project_logits(config, params, hidden, dropout_rng=dropout_rng)


def flops_per_example(config, inputs_len: int, targets_len: int, *, head_positions=None) -> float:
    """Forward-pass FLOPs of one example (a train step is ~3x). head_positions: how many positions the output head
    runs on (default: every target position; decoder-only: every position)."""
    return family(config).flops_per_example(config, inputs_len, targets_len, head_positions=head_positions)


def option_logits(config, params, inputs, options):
    """Logits [B*K, Lt, vocab] of K right-padded options [B, K, Lt] per input [B, Lin], prompt shared per input."""
    return family(config).option_logits(config, params, inputs, options)


def feature_converter(config, **packing_options):
    """The converter the family trains on; for prompt tuning it reserves the prompt slots in every segment."""
    peft = getattr(config, 'peft', None)
    if peft is not None and peft.method == 'prompt':
        packing_options = {'prompt_slots': peft.prompt_length, **packing_options}
    return family(config).feature_converter(**packing_options)


def for_platform(config, platform: str):
    """The config a step compiled for `platform` ('cpu', 'gpu', 'tpu') traces: attention_kernel 'auto' resolved for
    that platform, so a TPU program traced on a CPU host gets the TPU's kernel, not the host's."""
    kernel = _span_attention.kernel_for_platform(config.attention_kernel, platform,
                                                 f'{type(config).__name__}.attention_kernel')
    return config if kernel == config.attention_kernel else dataclasses.replace(config, attention_kernel=kernel)


def is_encoder_decoder(config) -> bool:
    return family(config).encoder_decoder
