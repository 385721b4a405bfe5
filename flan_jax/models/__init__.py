"""Model interface: functions that dispatch on the config's type (see base.py); import families only here."""
from flan_jax.models.base import FAMILIES, Family, family, family_by_name, shift_right  # noqa: F401
from flan_jax.models.decoder import DecoderConfig  # noqa: F401
from flan_jax.models.t5 import T5Config  # noqa: F401


def init_params(config, rng):
    return family(config).init_params(config, rng)


def param_logical_axes(config):
    return family(config).param_logical_axes(config)


def param_shapes(config):
    return family(config).param_shapes(config)


def count_params(config) -> int:
    return family(config).count_params(config)


def forward(config, params, batch, *, dropout_rng=None):
    """Logits [B, L, vocab] (float32) for a batch in the family's feature names (EncDec or PrefixLM)."""
    return family(config).forward(config, params, batch, dropout_rng=dropout_rng)


def hidden_states(config, params, batch, *, dropout_rng=None):
    """Final hidden states [B, L, emb_dim] (float32) after the final norm, before the output projection: for T5 the
    decoder's (one per target position), for decoder-only the stack's; forward's logits are these projected."""
    return family(config).hidden_states(config, params, batch, dropout_rng=dropout_rng)


def flops_per_example(config, inputs_len: int, targets_len: int) -> float:
    """Forward-pass FLOPs of one example (a train step is ~3x)."""
    return family(config).flops_per_example(config, inputs_len, targets_len)


def option_logits(config, params, inputs, options):
    """Logits [B*K, Lt, vocab] of K right-padded options [B, K, Lt] per input [B, Lin], prompt shared per input."""
    return family(config).option_logits(config, params, inputs, options)


def feature_converter(config, **packing_options):
    return family(config).feature_converter(**packing_options)


def is_encoder_decoder(config) -> bool:
    return family(config).encoder_decoder
