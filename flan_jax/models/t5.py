"""T5 1.1 encoder-decoder as pure functions over a plain dict with T5X parameter names.

The parameter tree is exactly T5X's (no 'params' wrapper) so checkpoints load without renaming.
All functions are jit-friendly: `config` is a frozen (hashable) dataclass meant to be static.

Architecture (T5 1.1): pre-norm RMSNorm in float32, no biases, no 1/sqrt(head_dim) scaling of attention
logits (the query kernel init absorbs it), one relative-position-bias table per stack shared by all
layers, gated GELU (tanh) MLP, untied float32 output projection `logits_dense`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flan_jax.models import peft as peft_lib
from flan_jax.models import span_attention
from flan_jax.models.sharding import batch_sharded
from flan_jax.models.layers import MASK_VALUE, Dropout, gelu_tanh, linear, run_layers
from flan_jax.models.t5_positions import relative_position_bias, relative_position_bucket  # noqa: F401 (public here too)

Params = dict
Batch = Mapping[str, Any]


_PRESETS = {
    # Byte-level smoke-test model (ByteVocabulary 259 ids padded to 384).
    'tiny': dict(vocab_size=384, emb_dim=128, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                 head_dim=32, mlp_dim=256),
    'small': dict(emb_dim=512, num_heads=6, num_encoder_layers=8, num_decoder_layers=8, mlp_dim=1024),
    'base': dict(emb_dim=768, num_heads=12, num_encoder_layers=12, num_decoder_layers=12, mlp_dim=2048),
    'large': dict(emb_dim=1024, num_heads=16, num_encoder_layers=24, num_decoder_layers=24, mlp_dim=2816),
    'xl': dict(emb_dim=2048, num_heads=32, num_encoder_layers=24, num_decoder_layers=24, mlp_dim=5120),
    'xxl': dict(emb_dim=4096, num_heads=64, num_encoder_layers=24, num_decoder_layers=24, mlp_dim=10240),
}
_REMAT_POLICIES = ('none', 'full', 'dots')


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    emb_dim: int = 512
    num_heads: int = 6
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    head_dim: int = 64
    mlp_dim: int = 1024
    dropout_rate: float = 0.0
    dtype: str = 'float32'          # activation / compute dtype
    param_dtype: str = 'float32'    # storage dtype of the parameters
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    # Per-layer rematerialisation: 'none', 'full' (recompute everything), 'dots' (save matmul outputs).
    remat: str = 'none'
    # False: relative positions from arange over the (packed) row, like T5X; identical to per-segment
    # positions for contiguous segments (seqio packing) and needs only a [heads, L, L] bias instead of
    # [batch, heads, L, L]. True: use encoder_positions/decoder_positions when the batch has them.
    relative_positions_from_features: bool = False
    # Query/key block of the span attention (models/span_attention.py) for masked attention without dropout, on
    # the CPU backend, where both lengths are whole numbers of blocks; 0 computes the dense [Lq, Lk] scores. At
    # 512/128 the T5 small step measured 0.88x the dense one's time once the bias gradient left the span loop's
    # carry (docs/benchmarks.md, "Train").
    attention_block: int = 128
    # 'auto' (span kernel on a CPU backend, else dense), 'span', 'blocked' (query blocks of attention_block, scores
    # recomputed in the backward pass) or 'dense'; models.for_platform resolves 'auto' for the compile target. The
    # fused 'splash' and 'cudnn' take no relative-position bias: decoder-only models only.
    attention_kernel: str = 'auto'
    scan_layers: bool = False   # one lax.scan over each stack's layers (layers.run_layers): compile time, same numbers
    peft: Optional[peft_lib.PeftConfig] = None   # parameter-efficient tuning (models/peft.py); None = full model

    def __post_init__(self):
        for key in ('dtype', 'param_dtype'):
            value = getattr(self, key)
            if value not in ('float32', 'bfloat16', 'float16'):
                raise ValueError(f'T5Config.{key}={value!r}: expected float32, bfloat16 or float16')
        if self.remat not in _REMAT_POLICIES:
            raise ValueError(f'T5Config.remat={self.remat!r}: expected one of {_REMAT_POLICIES}')
        if self.attention_kernel not in span_attention.KERNELS:
            raise ValueError(f'T5Config.attention_kernel={self.attention_kernel!r}: expected one of '
                             f'{span_attention.KERNELS}')
        if self.attention_kernel in span_attention.FUSED:
            raise ValueError(f'T5Config.attention_kernel={self.attention_kernel!r} takes no relative-position bias '
                             "(decoder-only models): choose 'auto', 'span', 'blocked' or 'dense'")
        if (not isinstance(self.dropout_rate, (int, float)) or isinstance(self.dropout_rate, bool)
                or not 0.0 <= self.dropout_rate < 1.0):
            raise ValueError(f'T5Config.dropout_rate={self.dropout_rate}: expected 0 <= rate < 1')
        for key in ('vocab_size', 'emb_dim', 'num_heads', 'head_dim', 'mlp_dim', 'num_encoder_layers',
                    'num_decoder_layers', 'relative_attention_num_buckets', 'relative_attention_max_distance'):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f'T5Config.{key}={value!r}: expected a positive int')
            if value <= 0:
                raise ValueError(f'T5Config.{key}={value}: must be positive')

    @classmethod
    def preset(cls, name: str, **overrides) -> 'T5Config':
        """Published T5 1.1 sizes ('small'..'xxl', vocab 32128) or 'tiny' (byte vocab 384)."""
        if name not in _PRESETS:
            raise ValueError(f'Unknown T5 preset {name!r}; known: {sorted(_PRESETS)}')
        return cls(**{**_PRESETS[name], **overrides})

    @property
    def joined_kv(self) -> int:
        return self.num_heads * self.head_dim


# ----------------------------------------------------------------------------------------------
# Parameters: one spec table drives init_params, param_logical_axes and count_params.

@dataclasses.dataclass(frozen=True)
class _ParamSpec:
    shape: tuple
    axes: tuple
    init: str          # 'embedding' | 'relpos' | 'attention' | 'query' | 'mlp' | 'ones'


def _attention_specs(config: T5Config) -> dict:
    d, hk = config.emb_dim, config.joined_kv
    return {
        'query': {'kernel': _ParamSpec((d, hk), ('embed', 'joined_kv'), 'query')},
        'key': {'kernel': _ParamSpec((d, hk), ('embed', 'joined_kv'), 'attention')},
        'value': {'kernel': _ParamSpec((d, hk), ('embed', 'joined_kv'), 'attention')},
        'out': {'kernel': _ParamSpec((hk, d), ('joined_kv', 'embed'), 'attention')},
    }


def _param_specs(config: T5Config) -> dict:
    d, f, v = config.emb_dim, config.mlp_dim, config.vocab_size

    def norm():
        return {'scale': _ParamSpec((d,), ('embed',), 'ones')}

    def mlp():
        return {'wi_0': {'kernel': _ParamSpec((d, f), ('embed', 'mlp'), 'mlp')},
                'wi_1': {'kernel': _ParamSpec((d, f), ('embed', 'mlp'), 'mlp')},
                'wo': {'kernel': _ParamSpec((f, d), ('mlp', 'embed'), 'mlp')}}

    relpos = {'rel_embedding': _ParamSpec((config.num_heads, config.relative_attention_num_buckets),
                                          ('heads', 'relpos_buckets'), 'relpos')}
    encoder = {'relpos_bias': relpos, 'encoder_norm': norm()}
    for i in range(config.num_encoder_layers):
        encoder[f'layers_{i}'] = {'pre_attention_layer_norm': norm(), 'attention': _attention_specs(config),
                                  'pre_mlp_layer_norm': norm(), 'mlp': mlp()}
    decoder = {'relpos_bias': dict(relpos), 'decoder_norm': norm(),
               'logits_dense': {'kernel': _ParamSpec((d, v), ('embed', 'vocab'), 'mlp')}}
    for i in range(config.num_decoder_layers):
        decoder[f'layers_{i}'] = {
            'pre_self_attention_layer_norm': norm(), 'self_attention': _attention_specs(config),
            'pre_cross_attention_layer_norm': norm(), 'encoder_decoder_attention': _attention_specs(config),
            'pre_mlp_layer_norm': norm(), 'mlp': mlp()}
    return {'token_embedder': {'embedding': _ParamSpec((v, d), ('vocab', 'embed'), 'embedding')},
            'encoder': encoder, 'decoder': decoder}


def _is_spec(x) -> bool:
    return isinstance(x, _ParamSpec)


def _init_one(spec: _ParamSpec, key, config: T5Config) -> jax.Array:
    inits = jax.nn.initializers
    if spec.init == 'ones':
        value = jnp.ones(spec.shape, jnp.float32)
    elif spec.init == 'embedding':
        value = inits.normal(stddev=1.0)(key, spec.shape, jnp.float32)
    elif spec.init == 'relpos':
        value = inits.variance_scaling(1.0, 'fan_avg', 'uniform')(key, spec.shape, jnp.float32)
    elif spec.init in ('attention', 'query'):
        value = inits.variance_scaling(1.0, 'fan_in', 'normal')(key, spec.shape, jnp.float32)
        if spec.init == 'query':  # absorbs the missing 1/sqrt(head_dim) logit scaling
            value = value / math.sqrt(config.head_dim)
    elif spec.init == 'mlp':
        value = inits.variance_scaling(1.0, 'fan_in', 'truncated_normal')(key, spec.shape, jnp.float32)
    else:
        raise ValueError(f'unknown init kind {spec.init!r}')
    return value.astype(config.param_dtype)


def init_params(config: T5Config, rng: jax.Array) -> Params:
    """Fresh T5X-style initialisation; a plain nested dict of arrays in `config.param_dtype`."""
    specs = _param_specs(config)
    leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(rng, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [_init_one(s, k, config) for s, k in zip(leaves, keys)])


def param_logical_axes(config: T5Config) -> dict:
    """Same tree as init_params; each leaf is a tuple of logical axis names."""
    return jax.tree_util.tree_map(lambda s: s.axes, _param_specs(config), is_leaf=_is_spec)


def param_shapes(config: T5Config) -> dict:
    """Same tree as init_params; each leaf is jax.ShapeDtypeStruct (no allocation)."""
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(config.param_dtype)),
                                  _param_specs(config), is_leaf=_is_spec)


def count_params(config: T5Config) -> int:
    leaves = jax.tree_util.tree_leaves(_param_specs(config), is_leaf=_is_spec)
    return int(sum(np.prod(s.shape) for s in leaves))


# ----------------------------------------------------------------------------------------------
# Blocks.

def rms_norm(x: jax.Array, scale: jax.Array, config: T5Config) -> jax.Array:
    """RMSNorm computed in float32 (no mean subtraction, no bias), returned in compute dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + config.layer_norm_epsilon)
    return y.astype(config.dtype) * scale.astype(config.dtype)


def _split_heads(x: jax.Array, config: T5Config) -> jax.Array:
    return x.reshape(x.shape[:-1] + (config.num_heads, config.head_dim))


def project_kv(p: Mapping, x: jax.Array, config: T5Config):
    """Key and value projections [B, L, heads, head_dim] of `x` for attention block params `p`."""
    k = linear(p['key'], x, config.dtype)
    v = linear(p['value'], x, config.dtype)
    return _split_heads(k, config), _split_heads(v, config)


def attend(p: Mapping, x_q: jax.Array, k: jax.Array, v: jax.Array, mask, bias, config: T5Config,
           dropout: Dropout) -> jax.Array:
    """Multi-head attention of queries from x_q [B, Lq, d] over k, v [B, Lk, h, hd].

    mask: bool broadcastable to [B, h, Lq, Lk] (or None); bias: float broadcastable (or None).
    Logits and softmax in float32; no 1/sqrt(head_dim) scaling (T5 convention).
    """
    k, v, mask, bias = peft_lib.with_prefix(p.get('prefix'), k, v, mask, bias)
    q = _split_heads(linear(p['query'], x_q, config.dtype), config)
    kernel = _kernel(q, k, mask, bias, dropout, config)
    if kernel is not None:
        return linear(p['out'], _kernel_attend(kernel, q, k, v.astype(config.dtype), mask, bias, config), config.dtype)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    if bias is not None and bias.shape[0] == 1 and mask is not None:
        logits = _masked_shared_bias_logits(logits, bias, mask)
    else:
        if bias is not None:
            logits = logits + bias
        if mask is not None:
            logits = jnp.where(mask, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout(probs, broadcast_axes=(-2,)).astype(config.dtype)  # T5X shares it across queries
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v.astype(config.dtype))
    out = out.reshape(out.shape[:-2] + (config.joined_kv,))
    return linear(p['out'], out, config.dtype)


def _kernel(q, k, mask, bias, dropout: Dropout, config: T5Config):
    """span_attention's span or blocked kernel where it applies (None: the dense path below). The kernels need a mask
    shared by the heads, a bias shared by the rows, and no attention dropout."""
    if mask is None or mask.shape[1] != 1 or (bias is not None and bias.shape[0] != 1) or dropout.active:
        return None
    return span_attention.choose(q.shape[1], k.shape[1], config.attention_block, config.attention_kernel)


def _kernel_attend(kernel, q, k, v, mask, bias, config: T5Config) -> jax.Array:
    """Attention output [B, Lq, h * hd] through a span_attention kernel (heads as its kv axis, one query group,
    scale 1)."""
    b, lq = q.shape[0], q.shape[1]
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    out = kernel(heads_first(q)[:, :, :, None], heads_first(k), heads_first(v), mask[:, 0],
                 1.0, config.attention_block, None if bias is None else bias[0][:, :, None, :])
    return heads_first(out[:, :, :, 0]).reshape(b, lq, config.joined_kv)


@jax.custom_vjp
def _masked_shared_bias_logits(logits: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
    """where(mask, logits + bias, MASK_VALUE) for logits [B, h, q, k], bias [1, h, q, k], mask bool [B, 1|h, q, k]."""
    return jnp.where(mask, logits + bias, MASK_VALUE)


def _masked_shared_bias_logits_fwd(logits, bias, mask):
    return _masked_shared_bias_logits(logits, bias, mask), mask


def _masked_shared_bias_logits_bwd(mask, grad):
    # Behind the softmax backward the cotangent is already 0 at masked keys of any row with a real key, but a fully
    # masked query row (padding) has a uniform softmax, so it carries whatever cotangent its output got, e.g. from loss
    # weight on padding positions. The select zeroes it, as autodiff of the forward's select would; XLA fuses it into
    # the softmax backward. The bias gradient is then a [1, B] x [B, h*q*k] product, reading that array once per
    # layer; left to autodiff, XLA:CPU fused every layer's softmax backward into one slow reduction (the bias is
    # shared by all layers), ~12% of a T5 small step.
    grad = jnp.where(mask, grad, jnp.zeros((), grad.dtype))
    rows = grad.shape[0]
    summed = jnp.dot(jnp.ones((1, rows), grad.dtype), grad.reshape(rows, -1))
    return grad, summed.reshape((1,) + grad.shape[1:]), None


_masked_shared_bias_logits.defvjp(_masked_shared_bias_logits_fwd, _masked_shared_bias_logits_bwd)


def gated_mlp(p: Mapping, x: jax.Array, config: T5Config, dropout: Dropout) -> jax.Array:
    gate = gelu_tanh(linear(p['wi_0'], x, config.dtype))
    hidden = dropout(gate * linear(p['wi_1'], x, config.dtype), broadcast_axes=(-2,))
    return linear(p['wo'], hidden, config.dtype)


def _remat(fn, config: T5Config):
    if config.remat == 'full':
        return jax.checkpoint(fn)
    if config.remat == 'dots':
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)
    return fn


def embed(params: Params, tokens: jax.Array, config: T5Config) -> jax.Array:
    return jnp.take(params['token_embedder']['embedding'], tokens.astype(jnp.int32), axis=0).astype(config.dtype)


def _require(batch: Batch, key: str, where: str):
    if key not in batch:
        raise KeyError(f'{where}: batch is missing feature {key!r} (has {sorted(batch)})')
    return batch[key]


def _positions(batch: Batch, key: str, length: int, config: T5Config):
    if config.relative_positions_from_features and key in batch:
        return jnp.asarray(batch[key], jnp.int32)
    return np.arange(length, dtype=np.int32)


def _encoder_valid(batch: Batch) -> jax.Array:
    """[B, Lin] bool: real (non-padding) encoder tokens."""
    if 'encoder_segment_ids' in batch:
        return batch['encoder_segment_ids'] != 0
    return _require(batch, 'encoder_input_tokens', 'T5 encoder mask') != 0


# ----------------------------------------------------------------------------------------------
# Encoder / decoder / forward.

def _encoder_layer(p, x, mask, bias, rng, config: T5Config):
    drop = Dropout(rng, config.dropout_rate)
    x = batch_sharded(x)
    y = rms_norm(x, p['pre_attention_layer_norm']['scale'], config)
    k, v = project_kv(p['attention'], y, config)
    attended = peft_lib.adapter(p.get('adapter_attention'), attend(p['attention'], y, k, v, mask, bias, config, drop))
    x = x + drop(attended, (-2,))
    y = rms_norm(x, p['pre_mlp_layer_norm']['scale'], config)
    x = x + drop(peft_lib.adapter(p.get('adapter_mlp'), gated_mlp(p['mlp'], y, config, drop)), (-2,))
    return batch_sharded(x)


def encode(config: T5Config, params: Params, batch: Batch, *, dropout_rng=None) -> jax.Array:
    """Encoder output [B, Lin, emb_dim] in compute dtype (after encoder_norm and dropout)."""
    tokens = _require(batch, 'encoder_input_tokens', 'encode')
    length = tokens.shape[1]
    valid = _encoder_valid(batch)
    mask = valid[:, None, None, :] & valid[:, None, :, None]
    if 'encoder_segment_ids' in batch:
        seg = batch['encoder_segment_ids']
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    pos = _positions(batch, 'encoder_positions', length, config)
    bias = relative_position_bias(params['encoder']['relpos_bias']['rel_embedding'], pos, pos, True, config)
    bias = bias[None] if bias.ndim == 3 else bias
    rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, 0)
    drop = Dropout(None if rng is None else jax.random.fold_in(rng, 10**6), config.dropout_rate)

    x = peft_lib.insert_prompt(params.get('prompt'), embed(params, tokens, config),  # first P slots per segment
                               batch.get('encoder_positions', np.arange(length)))
    x = drop(x, (-2,))
    layer_fn = _remat(lambda p, x, r: _encoder_layer(p, x, mask, bias, r, config), config)
    x = run_layers(layer_fn, params['encoder'], config.num_encoder_layers, x, rng, config.scan_layers)
    x = rms_norm(x, params['encoder']['encoder_norm']['scale'], config)
    return drop(x)


def _decoder_layer(p, y, encoded, self_mask, self_bias, cross_mask, rows_per_input, rng, config):
    drop = Dropout(rng, config.dropout_rate)
    y, encoded = batch_sharded(y), batch_sharded(encoded)
    z = rms_norm(y, p['pre_self_attention_layer_norm']['scale'], config)
    k, v = project_kv(p['self_attention'], z, config)
    attended = attend(p['self_attention'], z, k, v, self_mask, self_bias, config, drop)
    y = y + drop(peft_lib.adapter(p.get('adapter_attention'), attended), (-2,))

    z = rms_norm(y, p['pre_cross_attention_layer_norm']['scale'], config)
    # K/V once per encoder row; the `rows_per_input` decoder rows sharing it become one long query row.
    k, v = project_kv(p['encoder_decoder_attention'], encoded, config)
    grouped = z.reshape((encoded.shape[0], rows_per_input * z.shape[1], z.shape[2]))
    cross = attend(p['encoder_decoder_attention'], grouped, k, v, cross_mask, None, config, drop)
    y = y + drop(cross.reshape(z.shape), (-2,))

    z = rms_norm(y, p['pre_mlp_layer_norm']['scale'], config)
    y = y + drop(peft_lib.adapter(p.get('adapter_mlp'), gated_mlp(p['mlp'], z, config, drop)), (-2,))
    return batch_sharded(y)


def decode(config: T5Config, params: Params, encoded: jax.Array, batch: Batch, *, dropout_rng=None,
           decoder_rows_per_input: int = 1) -> jax.Array:
    """Decoder logits [B * decoder_rows_per_input, Ltgt, vocab] (float32): decode_hidden's output projected."""
    return output_logits(params, decode_hidden(config, params, encoded, batch, dropout_rng=dropout_rng,
                                               decoder_rows_per_input=decoder_rows_per_input))


def decode_hidden(config: T5Config, params: Params, encoded: jax.Array, batch: Batch, *, dropout_rng=None,
                  decoder_rows_per_input: int = 1) -> jax.Array:
    """Final decoder hidden states [B * decoder_rows_per_input, Ltgt, d] (after decoder_norm and dropout, compute
    dtype) given `encoded` [B, Lin, d]; decode projects them to logits.

    batch: decoder_input_tokens [B*R, Ltgt]; encoder_input_tokens (or encoder_segment_ids) [B, Lin] for
    the cross-attention mask; optional decoder_segment_ids/decoder_positions (packed; then R must be 1).
    With R = decoder_rows_per_input > 1, decoder rows r*R..r*R+R-1 all attend to encoder row r (used to
    score several options per input without repeating the encoder output).
    """
    tokens = _require(batch, 'decoder_input_tokens', 'decode')
    rows, length = tokens.shape
    if rows != encoded.shape[0] * decoder_rows_per_input:
        raise ValueError(f'decode: decoder_input_tokens has {rows} rows; expected encoded rows '
                         f'{encoded.shape[0]} x decoder_rows_per_input {decoder_rows_per_input}')
    enc_valid = _encoder_valid(batch)
    causal = np.tril(np.ones((length, length), bool))[None, None]
    packed = 'decoder_segment_ids' in batch
    if packed:
        if decoder_rows_per_input != 1:
            raise ValueError('decode: packed decoder rows (decoder_segment_ids) need decoder_rows_per_input=1')
        dec_seg = batch['decoder_segment_ids']
        enc_seg = _require(batch, 'encoder_segment_ids', 'decode (packed)')
        dec_valid = dec_seg != 0
        self_mask = (causal & (dec_seg[:, None, :, None] == dec_seg[:, None, None, :])
                     & dec_valid[:, None, :, None] & dec_valid[:, None, None, :])
        cross_mask = ((dec_seg[:, None, :, None] == enc_seg[:, None, None, :])
                      & dec_valid[:, None, :, None] & enc_valid[:, None, None, :])
    else:
        # Unpacked: padding sits after the real targets, so causality alone keeps it out of real positions.
        self_mask = causal
        cross_mask = enc_valid[:, None, None, :]
    pos = _positions(batch, 'decoder_positions', length, config)
    bias = relative_position_bias(params['decoder']['relpos_bias']['rel_embedding'], pos, pos, False, config)
    bias = bias[None] if bias.ndim == 3 else bias
    rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, 1)
    drop = Dropout(None if rng is None else jax.random.fold_in(rng, 10**6), config.dropout_rate)

    y = drop(embed(params, tokens, config), (-2,))
    layer_fn = _remat(lambda p, y, enc, r: _decoder_layer(p, y, enc, self_mask, bias, cross_mask,
                                                          decoder_rows_per_input, r, config), config)
    y = run_layers(lambda p, y, r: layer_fn(p, y, encoded, r), params['decoder'], config.num_decoder_layers, y, rng,
                   config.scan_layers)
    y = rms_norm(y, params['decoder']['decoder_norm']['scale'], config)
    return drop(y, (-2,))


def output_logits(params: Params, y: jax.Array) -> jax.Array:
    """Untied output projection in float32 (T5X computes logits_dense in float32 for stability)."""
    return linear(params['decoder']['logits_dense'], y, jnp.float32)


def forward(config: T5Config, params: Params, batch: Batch, *, dropout_rng=None) -> jax.Array:
    """Logits [B, Ltgt, vocab] in float32 for a seqio EncDecFeatureConverter batch (packed or not).

    dropout_rng=None => deterministic (no dropout).
    """
    encoded = encode(config, params, batch, dropout_rng=dropout_rng)
    return decode(config, params, encoded, batch, dropout_rng=dropout_rng)


# ----------------------------------------------------------------------------------------------
# FLOPs for MFU.

def count_flops_per_example(config: T5Config, inputs_len: int, targets_len: int, *, head_positions=None) -> float:
    """Forward-pass FLOPs of one example (multiply-add = 2 FLOPs); a train step is ~3x this.

    Counts encoder matmuls on input tokens, decoder matmuls on target tokens, cross-attention K/V
    projections on input tokens, the attention score/value L^2 terms (full, unmasked, as computed) and
    the output logits. Embedding lookups, norms and softmax are ignored.
    """
    d, hk, f, v = config.emb_dim, config.joined_kv, config.mlp_dim, config.vocab_size
    attn_proj = 4 * d * hk
    mlp = 3 * d * f
    encoder = config.num_encoder_layers * (
        2 * (attn_proj + mlp) * inputs_len + 4 * inputs_len * inputs_len * hk)
    decoder = config.num_decoder_layers * (
        2 * (attn_proj + 2 * d * hk + mlp) * targets_len      # self-attn, cross q/out, mlp
        + 2 * (2 * d * hk) * inputs_len                       # cross-attention K/V on the encoder output
        + 4 * targets_len * targets_len * hk                  # self-attention scores + values
        + 4 * targets_len * inputs_len * hk)                  # cross-attention scores + values
    logits = 2 * d * v * (targets_len if head_positions is None else head_positions)
    return float(encoder + decoder + logits)
