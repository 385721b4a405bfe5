"""Parameter-efficient tuning for every model family: LoRA, Houlsby adapters, prompt tuning, prefix tuning.

All new parameters live under ONE top-level key, params['peft'], whose tree mirrors the base tree: LoRA factors sit at
the path of the kernel they adapt (minus '/kernel'), adapters at their layer, prefixes at their attention block, the
prompt at the top. `view` deep-merges that subtree into the base tree before a family's functions run, so the family
code sees e.g. p['query'] = {'kernel', 'lora_a', 'lora_b'} and only needs small hooks (`lora`, `adapter`,
`insert_prompt`, `with_prefix`); without 'peft' nothing is merged and the families run exactly as before.

Methods (all parameters float32, whatever the base's param_dtype):
- 'lora' (Hu et al. 2021): y = x W + (alpha / rank) dropout(x) A B on every kernel whose '/'-joined path fully matches
  `targets`. A [in, rank] is Kaiming-uniform (bound 1/sqrt(in), as the reference implementation), B [rank, out] is 0,
  so the model starts as the base. `merge` adds (alpha / rank) A B to W.
- 'adapter' (Houlsby et al. 2019): a bottleneck h + up(relu(down(h))) on the output of every self-attention sublayer
  and every MLP, before the residual add (T5 cross-attention has none). The up projection starts at 0 (identity).
- 'prompt' (Lester et al. 2021): `prompt_length` soft tokens. Packing reserves their slots: the packer of
  models.feature_converter(config) puts prompt_length placeholder tokens before each example's inputs, so every packed
  segment has its own copy, inside that segment (same segment id, its first positions), and the prompt counts toward
  the inputs length (truncation cuts the real inputs' end and is counted by the packer). The model replaces the
  embeddings at those slots: T5 encoder positions 0..P-1 of each segment; decoder-only positions 1..P (after BOS).
  Unpacked batches (no segment ids), option_logits and decode_start take raw inputs: the slots are inserted there
  (`reserve_prompt_slots`, `reserve_prompt_slots_in_batch`), so only packed batches must come from that packer.
- 'prefix' (Li & Liang 2021; P-tuning v2, Liu et al. 2021): `prefix_length` trainable keys and values per layer,
  prepended to the self-attention keys of the T5 encoder and decoder and of every decoder-only layer; every query of
  every segment attends to them (no relative-position bias, no RoPE: they are learned in the rotated space). With
  prefix_mlp_dim > 0 they are the output of an MLP (tanh) over a [prefix_length, emb_dim] embedding during training;
  `fold` replaces the MLP by its output.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flan_jax.models import quant
from flan_jax.utils import tree_paths

METHODS = ('lora', 'adapter', 'prompt', 'prefix')
DEFAULT_LORA_TARGETS = r'.*attention/(query|key|value|out)/kernel'
# Any non-zero id (0 is padding); the model never reads the token at a prompt slot.
PROMPT_SLOT_ID = 1
PROMPT_INIT_VOCAB = 5000   # Lester et al.: sample the prompt init from the first 5,000 vocabulary embeddings


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    method: str
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = DEFAULT_LORA_TARGETS
    adapter_dim: int = 64
    prompt_length: int = 100
    prefix_length: int = 20
    prefix_mlp_dim: int = 0
    # Prompt tuning's init (Lester et al. 2021): 'vocab' (sampled embeddings of the first 5,000 ids), 'labels' (the
    # class labels of the training mixture's option tasks first, the rest sampled), or a .npy file (load_prompt).
    prompt_init: str = 'vocab'
    # QLoRA (models/quant.py): the frozen base's 2-D kernels stored 'int8', 'int4' or 'nf4'; None keeps them as
    # loaded. LoRA only: prefix tuning finds its blocks by kernel path, and no other method is tested on it.
    base_quantization: Optional[str] = None

    def __post_init__(self):
        quant.check_mode(self.base_quantization)
        if self.base_quantization is not None and self.method != 'lora':
            raise ValueError(f'PeftConfig.base_quantization={self.base_quantization!r} needs method=\'lora\' '
                             f'(QLoRA), not {self.method!r}')
        if self.prompt_init not in ('vocab', 'labels') and not str(self.prompt_init).endswith('.npy'):
            raise ValueError(f"PeftConfig.prompt_init={self.prompt_init!r}: expected 'vocab', 'labels' or a .npy path")
        if self.method not in METHODS:
            raise ValueError(f'PeftConfig.method={self.method!r}: expected one of {METHODS}')
        for key in ('rank', 'adapter_dim', 'prompt_length', 'prefix_length'):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f'PeftConfig.{key}={value!r}: expected a positive int')
        if not isinstance(self.prefix_mlp_dim, (int, np.integer)) or self.prefix_mlp_dim < 0:
            raise ValueError(f'PeftConfig.prefix_mlp_dim={self.prefix_mlp_dim!r}: expected an int >= 0 (0 = no MLP)')
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f'PeftConfig.dropout={self.dropout}: expected 0 <= rate < 1')
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f'PeftConfig.targets={self.targets!r} is not a regular expression: {e}') from None

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank


def _layer_order(path: str) -> str:
    return re.sub(r'layers_(\d+)', lambda m: f'layers_{int(m[1]):06d}', path)


def _layer_paths(flat_shapes: Mapping) -> list:
    """Paths of the transformer layers (…/layers_<i>), in stack and layer order."""
    found = {m[0] for p in flat_shapes for m in [re.match(r'(.*/)?layers_\d+', p)] if m}
    return sorted(found, key=_layer_order)


def _self_attention_paths(flat_shapes: Mapping) -> list:
    """Self-attention blocks (T5 encoder 'attention', T5 decoder 'self_attention', decoder-only 'attention')."""
    found = {p[:-len('/key/kernel')] for p in flat_shapes
             if re.fullmatch(r'(.*/)?layers_\d+/(attention|self_attention)/key/kernel', p)}
    return sorted(found, key=_layer_order)


def lora_target_paths(peft: PeftConfig, flat_shapes: Mapping) -> list:
    """Kernel paths that `peft.targets` fully matches; a clear error when it matches none."""
    kernels = [p for p, s in flat_shapes.items() if p.endswith('/kernel') and len(s.shape) == 2]
    matched = sorted((p for p in kernels if re.fullmatch(peft.targets, p)), key=_layer_order)
    if not matched:
        others = [p for p in flat_shapes if re.fullmatch(peft.targets, p)]
        hint = f' (it matches {others[:3]}, which are not kernels)' if others else ''
        raise ValueError(f'PeftConfig.targets={peft.targets!r} matches no 2-D kernel of the model{hint}; LoRA '
                         f'targets kernels by their full path, e.g. {sorted(kernels, key=_layer_order)[:4]}')
    return matched


# ----------------------------------------------------------------------------------------------
# Parameter specs: path -> (shape, logical axes, init kind).

def _specs(config, base_shapes: Mapping, base_axes: Mapping) -> dict:
    peft, d = config.peft, config.emb_dim
    flat, axes = tree_paths.flatten(base_shapes), tree_paths.flatten(base_axes)
    specs = {}
    if peft.method == 'lora':
        for path in lora_target_paths(peft, flat):
            (n_in, n_out), (ax_in, ax_out) = flat[path].shape, axes[path]
            block = path[:-len('/kernel')]
            specs[f'{block}/lora_a'] = ((n_in, peft.rank), (ax_in, 'lora_rank'), ('lora_a', n_in))
            specs[f'{block}/lora_b'] = ((peft.rank, n_out), ('lora_rank', ax_out), ('zeros',))
    elif peft.method == 'adapter':
        m = peft.adapter_dim
        for layer in _layer_paths(flat):
            for where in ('adapter_attention', 'adapter_mlp'):
                specs[f'{layer}/{where}/down/kernel'] = ((d, m), ('embed', 'adapter'), ('normal', 1e-2))
                specs[f'{layer}/{where}/down/bias'] = ((m,), ('adapter',), ('zeros',))
                specs[f'{layer}/{where}/up/kernel'] = ((m, d), ('adapter', 'embed'), ('zeros',))
                specs[f'{layer}/{where}/up/bias'] = ((d,), ('embed',), ('zeros',))
    elif peft.method == 'prompt':
        specs['prompt'] = ((peft.prompt_length, d), ('prompt', 'embed'), ('uniform', 0.5))
    else:
        blocks = _self_attention_paths(flat)
        width = flat[f'{blocks[0]}/key/kernel'].shape[1]
        p, h = peft.prefix_length, peft.prefix_mlp_dim
        if h:
            out = len(blocks) * 2 * width
            specs['prefix_mlp/embedding'] = ((p, d), ('prefix', 'embed'), ('normal', 1.0))
            specs['prefix_mlp/wi/kernel'] = ((d, h), ('embed', 'mlp'), ('lora_a', d))
            specs['prefix_mlp/wi/bias'] = ((h,), ('mlp',), ('zeros',))
            specs['prefix_mlp/wo/kernel'] = ((h, out), ('mlp', 'joined_kv'), ('normal', 0.02))
            specs['prefix_mlp/wo/bias'] = ((out,), ('joined_kv',), ('zeros',))
        else:
            for block in blocks:
                for name in ('key', 'value'):
                    specs[f'{block}/prefix/{name}'] = ((p, width), ('prefix', 'joined_kv'), ('normal', 0.02))
    return specs


def _init_leaf(spec, key) -> jax.Array:
    shape, _, init = spec
    if init[0] == 'zeros':
        return jnp.zeros(shape, jnp.float32)
    if init[0] == 'lora_a':   # Kaiming uniform with a = sqrt(5): bound 1 / sqrt(fan_in)
        bound = 1.0 / np.sqrt(init[1])
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    if init[0] == 'uniform':
        return jax.random.uniform(key, shape, jnp.float32, -init[1], init[1])
    return init[1] * jax.random.normal(key, shape, jnp.float32)


def init(config, rng: jax.Array, base_shapes: Mapping, base_axes: Mapping) -> dict:
    """The 'peft' subtree of fresh parameters (prompt: uniform in [-0.5, 0.5]; see init_from_base)."""
    specs = _specs(config, base_shapes, base_axes)
    keys = jax.random.split(rng, max(len(specs), 1))
    leaves = {path: _init_leaf(spec, k) for (path, spec), k in zip(sorted(specs.items()), keys)}
    return tree_paths.unflatten(leaves)


def logical_axes(config, base_shapes: Mapping, base_axes: Mapping) -> dict:
    return tree_paths.unflatten({p: s[1] for p, s in _specs(config, base_shapes, base_axes).items()})


def shapes(config, base_shapes: Mapping, base_axes: Mapping) -> dict:
    return tree_paths.unflatten({p: jax.ShapeDtypeStruct(s[0], jnp.float32)
                       for p, s in _specs(config, base_shapes, base_axes).items()})


def count(config, base_shapes: Mapping, base_axes: Mapping) -> int:
    return int(sum(np.prod(s[0]) for s in _specs(config, base_shapes, base_axes).values()))


# ----------------------------------------------------------------------------------------------
# Prompt init (Lester et al. 2021: sampled vocabulary, class labels, or a saved prompt).

def init_from_base(config, rng: jax.Array, peft_params: dict, base_params: Mapping,
                   label_token_ids: Optional[Sequence] = None) -> dict:
    """peft_params with the prompt set from the base embeddings: the mean embedding of each class label's token ids
    first (in the given order, at most prompt_length), the rest sampled without replacement from the first 5,000 ids.
    Other methods need nothing from the base and come back unchanged."""
    if config.peft.method != 'prompt':
        return peft_params
    table = jnp.asarray(base_params['token_embedder']['embedding'], jnp.float32)
    if getattr(config, 'scale_embeddings', False):   # the prompt replaces embeddings after Gemma's scaling
        table = table * np.sqrt(config.emb_dim)
    length = config.peft.prompt_length
    rows = []
    for label in list(label_token_ids or [])[:length]:
        ids = np.atleast_1d(np.asarray(label, np.int64))
        ids = ids[ids != 0]
        if not len(ids) or ids.max() >= table.shape[0]:
            raise ValueError(f'init_peft: class label token ids {ids.tolist()} are empty or outside the vocabulary '
                             f'({table.shape[0]} ids)')
        rows.append(jnp.mean(table[ids], axis=0))
    missing = length - len(rows)
    if missing:
        pool = min(PROMPT_INIT_VOCAB, table.shape[0])
        ids = jax.random.choice(rng, pool, (missing,), replace=missing > pool)
        rows.extend(table[ids])
    return {**peft_params, 'prompt': jnp.stack(rows)}


def load_prompt(path: str, config=None) -> np.ndarray:
    """A prompt [prompt_length, emb_dim] saved with numpy.save; checked against `config` when given."""
    prompt = np.load(path)
    if config is not None:
        want = (config.peft.prompt_length, config.emb_dim)
        if prompt.shape != want:
            raise ValueError(f'load_prompt({path!r}): shape {prompt.shape}, but the config wants {want} '
                             '(PeftConfig.prompt_length, emb_dim)')
    return prompt.astype(np.float32)


def reserve_prompt_slots(config, inputs: jax.Array) -> jax.Array:
    """Raw right-padded inputs [B, L] -> [B, P + L] with the prompt slots first (prompt tuning only)."""
    if config.peft is None or config.peft.method != 'prompt':
        return inputs
    slots = jnp.full((inputs.shape[0], config.peft.prompt_length), PROMPT_SLOT_ID, inputs.dtype)
    return jnp.concatenate([slots, inputs], axis=1)


def reserve_prompt_slots_in_batch(config, batch: Mapping, encoder_decoder: bool):
    """(batch, extra positions) for forward: an unpacked batch (no segment ids) gets the prompt slots inserted where
    the packer puts them (T5: before the encoder input; decoder-only: after BOS, so its logits gain P leading
    positions, which the caller drops); a packed batch already has them and comes back as it is."""
    peft = config.peft
    segment_key = 'encoder_segment_ids' if encoder_decoder else 'decoder_segment_ids'
    if peft is None or peft.method != 'prompt' or segment_key in batch:
        return batch, 0
    if encoder_decoder:
        return {**batch, 'encoder_input_tokens': reserve_prompt_slots(config, batch['encoder_input_tokens'])}, 0
    length = peft.prompt_length
    after_bos = lambda x, fill: jnp.concatenate([x[:, :1], jnp.broadcast_to(fill, (x.shape[0], length)).astype(x.dtype),
                                                 x[:, 1:]], axis=1)
    batch = {**batch, 'decoder_input_tokens': after_bos(batch['decoder_input_tokens'], PROMPT_SLOT_ID)}
    if 'decoder_causal_attention' in batch:   # the prompt is part of the prefix
        batch['decoder_causal_attention'] = after_bos(batch['decoder_causal_attention'], 1)
    if 'decoder_positions' in batch:
        pos = batch['decoder_positions']
        batch['decoder_positions'] = jnp.concatenate([pos[:, :1], pos[:, :1] + 1 + jnp.arange(length)[None],
                                                      pos[:, 1:] + length], axis=1)
    return batch, length


# ----------------------------------------------------------------------------------------------
# The merged view the families run on, and the hooks they call.

def _prefix_from_mlp(config, params: Mapping, mlp: Mapping) -> dict:
    """{block path + '/prefix/key'|'value': [P, width]} computed by the reparameterization MLP."""
    hidden = jnp.tanh(mlp['embedding'] @ mlp['wi']['kernel'] + mlp['wi']['bias'])
    out = hidden @ mlp['wo']['kernel'] + mlp['wo']['bias']            # [P, blocks * 2 * width]
    blocks = _self_attention_paths(tree_paths.flatten(params))
    parts = jnp.split(out, 2 * len(blocks), axis=1)
    flat = {}
    for i, block in enumerate(blocks):
        flat[f'{block}/prefix/key'], flat[f'{block}/prefix/value'] = parts[2 * i], parts[2 * i + 1]
    return flat


def _merge_into(base: Mapping, extra: Mapping, where: str = '') -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping):
            if key in merged and not isinstance(merged[key], Mapping):
                raise ValueError(f"params['peft']/{where}{key} collides with a base parameter")
            merged[key] = _merge_into(merged.get(key, {}), value, f'{where}{key}/')
        elif key in merged:
            raise ValueError(f"params['peft']/{where}{key} collides with a base parameter")
        else:
            merged[key] = value
    return merged


def view(config, params: Mapping, dropout_rng: Optional[jax.Array] = None) -> dict:
    """The base tree with params['peft'] merged in (LoRA's B pre-scaled by alpha / rank; the prefix MLP evaluated;
    a LoRA dropout key per adapted kernel when training with dropout). Params without 'peft' come back as they are."""
    if 'peft' not in params:
        return params
    if config.peft is None:
        raise ValueError("params have a 'peft' subtree but the model config has peft=None")
    base = {k: v for k, v in params.items() if k != 'peft'}
    flat = tree_paths.flatten(params['peft'])
    peft = config.peft
    if 'prefix_mlp' in params['peft']:
        flat = {p: v for p, v in flat.items() if not p.startswith('prefix_mlp/')}
        flat.update(_prefix_from_mlp(config, base, params['peft']['prefix_mlp']))
    if peft.method == 'lora':
        blocks = sorted((p[:-len('/lora_b')] for p in flat if p.endswith('/lora_b')), key=_layer_order)
        for i, block in enumerate(blocks):
            flat[f'{block}/lora_b'] = flat[f'{block}/lora_b'] * peft.lora_scale
            if dropout_rng is not None and peft.dropout > 0:
                flat[f'{block}/lora_rng'] = jax.random.fold_in(dropout_rng, 7919 + i)
                flat[f'{block}/lora_keep'] = jnp.float32(1.0 - peft.dropout)
    return _merge_into(base, tree_paths.unflatten(flat))


def lora(p: Mapping, x: jax.Array, y: jax.Array, dtype) -> jax.Array:
    """y + dropout(x) A B' for a viewed block p (B' = B * alpha / rank); the matmuls as 2-D products."""
    if 'lora_rng' in p:
        keep = jax.random.bernoulli(p['lora_rng'], p['lora_keep'], x.shape)
        x = jnp.where(keep, x / p['lora_keep'].astype(x.dtype), 0).astype(x.dtype)
    flat = x.astype(dtype).reshape(-1, x.shape[-1])
    delta = jnp.dot(jnp.dot(flat, p['lora_a'].astype(dtype)), p['lora_b'].astype(dtype))
    return y + delta.reshape(y.shape).astype(y.dtype)


def adapter(p: Optional[Mapping], h: jax.Array) -> jax.Array:
    """Houlsby bottleneck with its own residual; p None (no adapter here) => h unchanged."""
    if p is None:
        return h
    down = jax.nn.relu(jnp.dot(h, p['down']['kernel'].astype(h.dtype)) + p['down']['bias'].astype(h.dtype))
    return h + jnp.dot(down, p['up']['kernel'].astype(h.dtype)) + p['up']['bias'].astype(h.dtype)


def insert_prompt(prompt: Optional[jax.Array], x: jax.Array, slots) -> jax.Array:
    """x [B, L, d] with position l replaced by prompt[slots[.., l]] wherever 0 <= slot < prompt_length; prompt None
    (no prompt tuning) => x unchanged."""
    if prompt is None:
        return x
    length = prompt.shape[0]
    slots = jnp.asarray(slots, jnp.int32)
    inside = (slots >= 0) & (slots < length)
    rows = jnp.take(prompt.astype(x.dtype), jnp.clip(slots, 0, length - 1), axis=0)
    return jnp.where(jnp.broadcast_to(inside, x.shape[:2])[..., None], rows, x)


def with_prefix(prefix: Optional[Mapping], k: jax.Array, v: jax.Array, mask, bias=None):
    """Keys/values [B, Lk, heads, hd] with the prefix [P, heads * hd] prepended; the mask ([.., Lk] bool) lets every
    query see the prefix; the bias ([.., Lk] float) gives it 0. prefix None (no prefix here) => all unchanged."""
    if prefix is None:
        return k, v, mask, bias
    batch, _, heads, head_dim = k.shape
    length = prefix['key'].shape[0]

    def expand(x, like):
        return jnp.broadcast_to(x.reshape(1, length, heads, head_dim).astype(like.dtype),
                                (batch, length, heads, head_dim))
    k = jnp.concatenate([expand(prefix['key'], k), k], axis=1)
    v = jnp.concatenate([expand(prefix['value'], v), v], axis=1)
    if mask is not None:
        mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (length,), bool), mask], axis=-1)
    if bias is not None:
        bias = jnp.concatenate([jnp.zeros(bias.shape[:-1] + (length,), bias.dtype), bias], axis=-1)
    return k, v, mask, bias


# ----------------------------------------------------------------------------------------------
# Export: merge LoRA into the base; fold the prefix MLP away.

def merge(config, params: Mapping):
    """(config without peft, base params with (alpha / rank) A B added to each adapted kernel). LoRA only; a quantized
    base (QLoRA) comes back dequantized, in its original dtype."""
    if config.peft is None:
        return config, params
    if config.peft.method != 'lora':
        raise ValueError(f'merge_peft: PEFT method {config.peft.method!r} adds parameters that do not fit the base '
                         "model's shapes; only 'lora' merges (keep the PEFT parameters next to the base instead)")
    # A QLoRA base merges dequantized: the merged kernel is the one the LoRA factors were trained against.
    flat = tree_paths.flatten(quant.dequantize_tree({k: v for k, v in params.items() if k != 'peft'}))
    scale, extra = config.peft.lora_scale, tree_paths.flatten(params.get('peft', {}))
    for path, value in extra.items():
        if path.endswith('/lora_a'):
            block = path[:-len('/lora_a')]
            b = extra[f'{block}/lora_b']
            kernel = flat[f'{block}/kernel']
            delta = jnp.asarray(value, jnp.float32) @ jnp.asarray(b, jnp.float32) * scale
            flat[f'{block}/kernel'] = (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)
    return dataclasses.replace(config, peft=None), tree_paths.unflatten(flat)


def fold(config, params: Mapping):
    """Prefix tuning with an MLP: (config with prefix_mlp_dim=0, params whose 'peft' holds the MLP's output prefixes).
    Anything else has nothing to fold and comes back unchanged."""
    if config.peft is None or 'prefix_mlp' not in params.get('peft', {}):
        return config, params
    base = {k: v for k, v in params.items() if k != 'peft'}
    folded = tree_paths.unflatten({p: v.astype(jnp.float32)
                         for p, v in _prefix_from_mlp(config, base, params['peft']['prefix_mlp']).items()})
    return dataclasses.replace(config, peft=dataclasses.replace(config.peft, prefix_mlp_dim=0)), \
        {**base, 'peft': folded}
