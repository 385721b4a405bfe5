"""Decoder-only Transformer (Llama 3, Qwen2/2.5, Gemma) as pure functions over a plain parameter dict.

One config covers the three families; they differ only in switches:
  Llama 3: RMSNorm x * w, RoPE (theta, optional Llama-3 frequency scaling), SwiGLU, GQA, untied output head.
  Qwen2:   as Llama plus biases on the q/k/v projections; small sizes tie the output head to the embedding.
  Gemma:   embedding scaled by sqrt(emb_dim), GeGLU (tanh GELU), RMSNorm x * (1 + w), tied head.
(Touvron et al. 2023; Dubey et al. 2024 "The Llama 3 Herd of Models"; Qwen2 Technical Report 2024; Gemma Team
2024.) Packed batches use T5X's PrefixLM feature names: decoder_input_tokens, decoder_target_tokens,
decoder_segment_ids, decoder_positions and decoder_causal_attention (1 on each segment's prefix, which attends
bidirectionally when `prefix_lm`). RoPE reads decoder_positions, so packed segments restart at position 0, and no
query attends outside its own segment.
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
from flan_jax.models.layers import MASK_VALUE, Dropout, dense, gelu_tanh, linear, run_layers

Params = dict
Batch = Mapping[str, Any]
_REMAT_POLICIES = ('none', 'full', 'dots')
_ACTIVATIONS = ('silu', 'gelu_tanh')


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 2048
    emb_dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    mlp_dim: int = 256
    activation: str = 'silu'             # 'silu' (SwiGLU: Llama, Qwen2) or 'gelu_tanh' (GeGLU: Gemma)
    norm_eps: float = 1e-5
    norm_plus_one: bool = False          # Gemma's RMSNorm scales by (1 + w)
    scale_embeddings: bool = False       # Gemma multiplies the embedding by sqrt(emb_dim)
    tie_embeddings: bool = False         # output head = embedding^T (Qwen2 small sizes, Gemma)
    qkv_bias: bool = False               # Qwen2
    rope_theta: float = 10000.0
    # Llama-3 frequency scaling (factor, low_freq_factor, high_freq_factor, original_max_position), or ().
    rope_scaling: tuple = ()
    prefix_lm: bool = True               # decoder_causal_attention positions attend bidirectionally
    dropout_rate: float = 0.0
    dtype: str = 'float32'
    param_dtype: str = 'float32'
    remat: str = 'none'
    # Query/key block of the span attention (models/span_attention.py) for masked self-attention over whole rows;
    # 0 computes the dense [L, L] scores.
    attention_block: int = 128
    # 'auto' (span kernel on a CPU backend, else dense), 'span', 'blocked' (query blocks of attention_block, scores
    # recomputed in the backward pass), 'dense', 'splash' (Pallas splash attention on TPU, tiles from attention_block)
    # or 'cudnn' (cuDNN's fused attention on GPU, XLA's elsewhere): models/fused_attention.py. models.for_platform
    # resolves 'auto' for the compile target.
    attention_kernel: str = 'auto'
    scan_layers: bool = False   # one lax.scan over the layers (layers.run_layers): compile time, same numbers
    peft: Optional[peft_lib.PeftConfig] = None   # parameter-efficient tuning (models/peft.py); None = full model

    def __post_init__(self):
        for key in ('dtype', 'param_dtype'):
            if getattr(self, key) not in ('float32', 'bfloat16', 'float16'):
                raise ValueError(f'DecoderConfig.{key}={getattr(self, key)!r}: expected float32, bfloat16 or float16')
        if self.remat not in _REMAT_POLICIES:
            raise ValueError(f'DecoderConfig.remat={self.remat!r}: expected one of {_REMAT_POLICIES}')
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f'DecoderConfig.activation={self.activation!r}: expected one of {_ACTIVATIONS}')
        if self.attention_kernel not in span_attention.KERNELS:
            raise ValueError(f'DecoderConfig.attention_kernel={self.attention_kernel!r}: expected one of '
                             f'{span_attention.KERNELS}')
        if self.attention_kernel in span_attention.FUSED and self.dropout_rate:
            raise ValueError(f'DecoderConfig.attention_kernel={self.attention_kernel!r} has no attention dropout: set '
                             f'dropout_rate=0 (is {self.dropout_rate}) or choose another kernel')
        for key in ('vocab_size', 'emb_dim', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim'):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f'DecoderConfig.{key}={value!r}: expected a positive int')
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f'DecoderConfig.num_heads={self.num_heads} is not a multiple of '
                             f'num_kv_heads={self.num_kv_heads}')
        if self.head_dim % 2:
            raise ValueError(f'DecoderConfig.head_dim={self.head_dim}: RoPE needs an even head_dim')
        if self.rope_scaling and len(self.rope_scaling) != 4:
            raise ValueError(f'DecoderConfig.rope_scaling={self.rope_scaling!r}: expected () or (factor, '
                             'low_freq_factor, high_freq_factor, original_max_position)')
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f'DecoderConfig.dropout_rate={self.dropout_rate}: expected 0 <= rate < 1')


# ----------------------------------------------------------------------------------------------
# Parameters: (shape, logical axes, init) per leaf.

def _param_specs(config: DecoderConfig) -> dict:
    d, f, v = config.emb_dim, config.mlp_dim, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    norm = lambda: {'scale': ((d,), ('embed',), 'zeros' if config.norm_plus_one else 'ones')}
    attention = {'query': {'kernel': ((d, q), ('embed', 'joined_kv'), 'fan_in')},
                 'key': {'kernel': ((d, kv), ('embed', 'joined_kv'), 'fan_in')},
                 'value': {'kernel': ((d, kv), ('embed', 'joined_kv'), 'fan_in')},
                 'out': {'kernel': ((q, d), ('joined_kv', 'embed'), 'fan_in')}}
    if config.qkv_bias:
        for name, width in (('query', q), ('key', kv), ('value', kv)):
            attention[name]['bias'] = ((width,), ('joined_kv',), 'zeros')
    mlp = {'wi_0': {'kernel': ((d, f), ('embed', 'mlp'), 'fan_in')},
           'wi_1': {'kernel': ((d, f), ('embed', 'mlp'), 'fan_in')},
           'wo': {'kernel': ((f, d), ('mlp', 'embed'), 'fan_in')}}
    specs = {'token_embedder': {'embedding': ((v, d), ('vocab', 'embed'), 'embedding')}, 'final_norm': norm()}
    for i in range(config.num_layers):
        specs[f'layers_{i}'] = {'pre_attention_norm': norm(), 'attention': attention,
                                'pre_mlp_norm': norm(), 'mlp': mlp}
    if not config.tie_embeddings:
        specs['logits_dense'] = {'kernel': ((d, v), ('embed', 'vocab'), 'fan_in')}
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], tuple)


def init_params(config: DecoderConfig, rng: jax.Array) -> Params:
    leaves, treedef = jax.tree_util.tree_flatten(_param_specs(config), is_leaf=_is_spec)
    keys = jax.random.split(rng, len(leaves))

    def one(spec, key):
        shape, _, kind = spec
        if kind in ('ones', 'zeros'):
            value = (jnp.ones if kind == 'ones' else jnp.zeros)(shape, jnp.float32)
        elif kind == 'embedding':
            value = jax.random.normal(key, shape, jnp.float32) * (config.emb_dim ** -0.5 if config.tie_embeddings
                                                                  or config.scale_embeddings else 1.0)
        else:
            value = jax.nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')(key, shape, jnp.float32)
        return value.astype(config.param_dtype)

    return jax.tree_util.tree_unflatten(treedef, [one(s, k) for s, k in zip(leaves, keys)])


def param_logical_axes(config: DecoderConfig) -> dict:
    return jax.tree_util.tree_map(lambda s: s[1], _param_specs(config), is_leaf=_is_spec)


def param_shapes(config: DecoderConfig) -> dict:
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s[0], jnp.dtype(config.param_dtype)),
                                  _param_specs(config), is_leaf=_is_spec)


def count_params(config: DecoderConfig) -> int:
    return int(sum(np.prod(s[0]) for s in jax.tree_util.tree_leaves(_param_specs(config), is_leaf=_is_spec)))


# ----------------------------------------------------------------------------------------------
# Blocks.

def rms_norm(x: jax.Array, scale: jax.Array, config: DecoderConfig) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + config.norm_eps)
    if config.norm_plus_one:   # Gemma scales in float32 before the cast
        return (y * (1.0 + scale.astype(jnp.float32))).astype(config.dtype)
    return y.astype(config.dtype) * scale.astype(config.dtype)


def rope_frequencies(config: DecoderConfig) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] (float64 numpy), with Llama 3's low/high-frequency scaling if set."""
    inv = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim)
    if not config.rope_scaling:
        return inv
    factor, low, high, original = config.rope_scaling
    wavelen = 2 * math.pi / inv
    smooth = (original / wavelen - low) / (high - low)
    scaled = np.where(wavelen > original / low, inv / factor, inv)
    medium = (wavelen <= original / low) & (wavelen >= original / high)
    return np.where(medium, (1 - smooth) * inv / factor + smooth * inv, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, config: DecoderConfig) -> jax.Array:
    """Rotary embedding of x [B, L, heads, hd] at integer positions [B, L] (halves rotated, as HF does)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_frequencies(config), jnp.float32)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(config.dtype)


def _project(p: Mapping, x: jax.Array, heads: int, config: DecoderConfig) -> jax.Array:
    y = linear(p, x, config.dtype)
    if 'bias' in p:
        y = y + p['bias'].astype(config.dtype)
    return y.reshape(x.shape[:-1] + (heads, config.head_dim))


def attention(p: Mapping, x: jax.Array, positions: jax.Array, mask: jax.Array, config: DecoderConfig,
              drop: Dropout, cache: Optional[dict] = None, index=None):
    """Grouped-query self-attention. mask: bool [B, Lq, Lk]. With `cache` ({'key', 'value'}: [B, Lmax, kv, hd]),
    the new keys/values are written at `index` and the queries attend over the whole cache; returns (out, cache)."""
    q = apply_rope(_project(p['query'], x, config.num_heads, config), positions, config)
    k = apply_rope(_project(p['key'], x, config.num_kv_heads, config), positions, config)
    v = _project(p['value'], x, config.num_kv_heads, config).astype(config.dtype)
    if cache is not None:
        k = jax.lax.dynamic_update_slice(cache['key'], k.astype(cache['key'].dtype), (0, index, 0, 0))
        v = jax.lax.dynamic_update_slice(cache['value'], v.astype(cache['value'].dtype), (0, index, 0, 0))
        cache = {'key': k, 'value': v}
    k, v, mask, _ = peft_lib.with_prefix(p.get('prefix'), k, v, mask)
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    kv, groups, hd = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim
    kernel = span_attention.choose(lq, lk, config.attention_block, config.attention_kernel)
    if cache is None and not drop.active and kernel is not None:
        out = kernel(
            q.reshape(b, lq, kv, groups, hd).transpose(0, 2, 1, 3, 4), k.transpose(0, 2, 1, 3),
            v.transpose(0, 2, 1, 3), mask, 1.0 / math.sqrt(hd), config.attention_block)
        return linear(p['out'], out.transpose(0, 2, 1, 3, 4).reshape(b, lq, -1), config.dtype), cache
    # Heads first and each KV head's query groups stacked into one [groups * Lq] axis: the two products are then
    # plain batched matmuls; with (group, query) as separate free axes XLA:CPU ran the attention ~25% slower.
    q = q.reshape(b, lq, kv, groups, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv, groups * lq, hd)
    logits = jnp.einsum('bkqd,bksd->bkqs', q, k.transpose(0, 2, 1, 3), preferred_element_type=jnp.float32)
    logits = logits.reshape(b, kv, groups, lq, lk)
    logits = jnp.where(mask[:, None, None], logits / math.sqrt(hd), MASK_VALUE)
    probs = drop(jax.nn.softmax(logits, axis=-1), broadcast_axes=(-2,)).astype(config.dtype)
    out = jnp.einsum('bkqs,bksd->bkqd', probs.reshape(b, kv, groups * lq, lk),
                     v.astype(config.dtype).transpose(0, 2, 1, 3))
    out = out.reshape(b, kv, groups, lq, hd).transpose(0, 3, 1, 2, 4)
    return linear(p['out'], out.reshape(b, lq, -1), config.dtype), cache


def gated_mlp(p: Mapping, x: jax.Array, config: DecoderConfig, drop: Dropout) -> jax.Array:
    gate = linear(p['wi_0'], x, config.dtype)
    gate = jax.nn.silu(gate) if config.activation == 'silu' else gelu_tanh(gate)
    hidden = drop(gate * linear(p['wi_1'], x, config.dtype), broadcast_axes=(-2,))
    return linear(p['wo'], hidden, config.dtype)


def layer(p: Mapping, x, positions, mask, rng, config: DecoderConfig, cache=None, index=None):
    drop = Dropout(rng, config.dropout_rate)
    x = batch_sharded(x)
    attended, cache = attention(p['attention'], rms_norm(x, p['pre_attention_norm']['scale'], config), positions,
                                mask, config, drop, cache, index)
    x = x + drop(peft_lib.adapter(p.get('adapter_attention'), attended), (-2,))
    mlp_out = gated_mlp(p['mlp'], rms_norm(x, p['pre_mlp_norm']['scale'], config), config, drop)
    x = x + drop(peft_lib.adapter(p.get('adapter_mlp'), mlp_out), (-2,))
    return batch_sharded(x), cache


def embed(params: Params, tokens: jax.Array, config: DecoderConfig) -> jax.Array:
    x = jnp.take(params['token_embedder']['embedding'], tokens.astype(jnp.int32), axis=0).astype(config.dtype)
    if config.scale_embeddings:   # HF Gemma rounds the normalizer to the activation dtype
        x = x * jnp.asarray(math.sqrt(config.emb_dim), config.dtype)
    return x


def output_logits(params: Params, y: jax.Array, config: DecoderConfig) -> jax.Array:
    return project_logits(params, rms_norm(y, params['final_norm']['scale'], config), config)


def project_logits(params: Params, y: jax.Array, config: DecoderConfig) -> jax.Array:
    """The output head (float32) on final-normed hidden states."""
    if config.tie_embeddings:
        return dense(y, params['token_embedder']['embedding'].T, jnp.float32)
    return linear(params['logits_dense'], y, jnp.float32)


def attention_mask(batch: Batch, config: DecoderConfig) -> jax.Array:
    """[B, L, L] bool: causal (or bidirectional inside a prefix-LM prefix), same segment, both tokens real."""
    tokens = batch['decoder_input_tokens']
    length = tokens.shape[1]
    causal = jnp.asarray(np.tril(np.ones((length, length), bool)))[None]
    if config.prefix_lm and 'decoder_causal_attention' in batch:
        prefix = batch['decoder_causal_attention'] > 0
        causal = causal | (prefix[:, :, None] & prefix[:, None, :])
    if 'decoder_segment_ids' in batch:
        seg = batch['decoder_segment_ids']
        return causal & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    # Unpacked rows are right-padded: causality alone keeps the padding out of the real positions.
    return jnp.broadcast_to(causal, (tokens.shape[0], length, length))


def _remat(fn, config: DecoderConfig):
    if config.remat == 'full':
        return jax.checkpoint(fn)
    if config.remat == 'dots':
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)
    return fn


def forward(config: DecoderConfig, params: Params, batch: Batch, *, dropout_rng=None) -> jax.Array:
    """Logits [B, L, vocab] in float32 for a (packed or unpacked) decoder-only / prefix-LM batch."""
    return project_logits(params, hidden_states(config, params, batch, dropout_rng=dropout_rng), config)


def hidden_states(config: DecoderConfig, params: Params, batch: Batch, *, dropout_rng=None) -> jax.Array:
    """Final hidden states [B, L, emb_dim] (after final_norm, compute dtype): the output head's input."""
    if 'decoder_input_tokens' not in batch:
        raise KeyError(f'decoder forward: batch is missing feature decoder_input_tokens (has {sorted(batch)})')
    tokens = batch['decoder_input_tokens']
    positions = batch.get('decoder_positions')
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    mask = attention_mask(batch, config)
    drop = Dropout(None if dropout_rng is None else jax.random.fold_in(dropout_rng, 10**6), config.dropout_rate)
    x = embed(params, tokens, config)
    x = peft_lib.insert_prompt(params.get('prompt'), x, positions - 1)   # after each segment's BOS (see peft.py)
    x = drop(x, (-2,))
    layer_fn = _remat(lambda p, x, r: layer(p, x, positions, mask, r, config)[0], config)
    x = run_layers(layer_fn, params, config.num_layers, x, dropout_rng, config.scan_layers)
    return rms_norm(drop(x, (-2,)), params['final_norm']['scale'], config)


def count_flops_per_example(config: DecoderConfig, inputs_len: int, targets_len: int, *,
                            head_positions=None) -> float:
    """Forward FLOPs of one inputs ++ targets sequence (multiply-add = 2): projections, MLP, L^2 attention, and the
    logits at `head_positions` positions (default: all of them)."""
    length = inputs_len + targets_len
    d, f = config.emb_dim, config.mlp_dim
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_token = 2 * (d * q * 2 + 2 * d * kv + 3 * d * f)
    attn = 4 * length * length * q
    head = length if head_positions is None else head_positions
    return float(config.num_layers * (per_token * length + attn) + 2 * d * config.vocab_size * head)


# ----------------------------------------------------------------------------------------------
# KV-cache decoding hooks (used through flan_jax.models.decoding).

def decode_start(config: DecoderConfig, params: Params, prompt_tokens: jax.Array, rows_per_input: int,
                 max_decode_len: int):
    """Prefills the cache with BOS ++ prompt for right-padded prompts [B, Lp] (0 = padding), as the prefix-LM
    converter lays a segment out. Rows are left-aligned to end together (positions still start at 0 per row).
    Returns (logits [B*R, vocab] for the first new token, fixed state, cache)."""
    batch, prompt_len = prompt_tokens.shape
    lengths = jnp.sum(prompt_tokens != 0, axis=1)
    pad = prompt_len - lengths                                     # [B] left padding of BOS ++ prompt
    slots = jnp.arange(prompt_len + 1)[None]
    source = slots - pad[:, None] - 1                              # -1 => BOS (id 0)
    gathered = jnp.take_along_axis(prompt_tokens, jnp.clip(source, 0, prompt_len - 1), axis=1)
    tokens = jnp.where(source >= 0, gathered, 0)
    real = slots >= pad[:, None]
    positions = jnp.maximum(slots - pad[:, None], 0)
    total = prompt_len + 1 + max_decode_len
    key_real = jnp.concatenate([real, jnp.ones((batch, max_decode_len), bool)], axis=1)
    keys = jnp.arange(total)[None, None, :]
    allowed = keys <= slots[:, :, None]
    if config.prefix_lm:
        allowed = allowed | (keys <= prompt_len)
    mask = allowed & key_real[:, None, :]
    empty = jnp.zeros((batch, total, config.num_kv_heads, config.head_dim), config.dtype)
    cache = {'key': [], 'value': []}
    x = embed(params, tokens, config)
    x = peft_lib.insert_prompt(params.get('prompt'), x, positions - 1)   # left padding has position 0
    for i in range(config.num_layers):
        x, c = layer(params[f'layers_{i}'], x, positions, mask, None, config, {'key': empty, 'value': empty}, 0)
        cache['key'].append(c['key'])
        cache['value'].append(c['value'])
    logits = output_logits(params, x[:, -1:], config)[:, 0]
    repeat = lambda a: jnp.repeat(a, rows_per_input, axis=0)
    fixed = {'pad': repeat(pad), 'key_real': repeat(key_real), 'start': jnp.int32(prompt_len + 1)}
    return repeat(logits), fixed, jax.tree_util.tree_map(repeat, cache)


def decode_step(config: DecoderConfig, params: Params, tokens: jax.Array, index, fixed, cache,
                rows_per_input: int):
    """Logits [N, vocab] after feeding new token number `index` (0-based) for every row; returns (logits, cache)."""
    del rows_per_input  # the prompt was repeated per row in decode_start
    slot = fixed['start'] + index
    positions = (slot - fixed['pad'])[:, None]
    total = fixed['key_real'].shape[1]
    mask = (fixed['key_real'] & (jnp.arange(total)[None] <= slot))[:, None, :]
    x = embed(params, tokens[:, None], config)
    new = {'key': [], 'value': []}
    for i in range(config.num_layers):
        x, c = layer(params[f'layers_{i}'], x, positions, mask, None, config,
                     {'key': cache['key'][i], 'value': cache['value'][i]}, slot)
        new['key'].append(c['key'])
        new['value'].append(c['value'])
    return output_logits(params, x, config)[:, 0], new
