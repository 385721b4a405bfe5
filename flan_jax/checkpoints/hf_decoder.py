"""Import and export Hugging Face LlamaForCausalLM, Qwen2ForCausalLM and GemmaForCausalLM directories.

Name mapping (HF Linear weights are [out, in] and therefore transposed):
    model.embed_tokens                        -> token_embedder/embedding
    model.layers.N.input_layernorm            -> layers_N/pre_attention_norm/scale
    model.layers.N.self_attn.{q,k,v,o}_proj   -> layers_N/attention/{query,key,value,out}/kernel (+ q/k/v bias)
    model.layers.N.post_attention_layernorm   -> layers_N/pre_mlp_norm/scale
    model.layers.N.mlp.{gate,up,down}_proj    -> layers_N/mlp/{wi_0,wi_1,wo}/kernel
    model.norm                                -> final_norm/scale
    lm_head                                   -> logits_dense/kernel (absent when tied)
"""
from __future__ import annotations

import json
import logging
import os
from typing import Mapping

import numpy as np

from flan_jax.checkpoints import param_check
from flan_jax.checkpoints.t5x import flatten, unflatten
from flan_jax.data.vocabularies import EOS_ID, PAD_ID
from flan_jax.models import DecoderConfig
import ml_dtypes
from safetensors.numpy import save_file

MODEL_TYPES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'gemma': 'GemmaForCausalLM'}
_ATTENTION = {'q_proj': 'query', 'k_proj': 'key', 'v_proj': 'value', 'o_proj': 'out'}
_MLP = {'gate_proj': 'wi_0', 'up_proj': 'wi_1', 'down_proj': 'wo'}
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)
# Our DecoderConfig fields -> the config.json keys a user edits when an HF directory does not match its weights.
CONFIG_KEYS = {'emb_dim': 'hidden_size', 'num_layers': 'num_hidden_layers', 'num_heads': 'num_attention_heads',
               'num_kv_heads': 'num_key_value_heads', 'mlp_dim': 'intermediate_size',
               'tie_embeddings': 'tie_word_embeddings'}


def hf_name_map(config) -> dict:
    """{HF name: (our flat path, transpose?)}."""
    names = {'model.embed_tokens.weight': ('token_embedder/embedding', False),
             'model.norm.weight': ('final_norm/scale', False)}
    if not config.tie_embeddings:
        names['lm_head.weight'] = ('logits_dense/kernel', True)
    for i in range(config.num_layers):
        hf, ours = f'model.layers.{i}', f'layers_{i}'
        names[f'{hf}.input_layernorm.weight'] = (f'{ours}/pre_attention_norm/scale', False)
        names[f'{hf}.post_attention_layernorm.weight'] = (f'{ours}/pre_mlp_norm/scale', False)
        for short, long in _ATTENTION.items():
            names[f'{hf}.self_attn.{short}.weight'] = (f'{ours}/attention/{long}/kernel', True)
            if config.qkv_bias and short != 'o_proj':
                names[f'{hf}.self_attn.{short}.bias'] = (f'{ours}/attention/{long}/bias', False)
        for short, long in _MLP.items():
            names[f'{hf}.mlp.{short}.weight'] = (f'{ours}/mlp/{long}/kernel', True)
    return names


def _rope(hf: Mapping):
    """(theta, Llama-3 scaling tuple or ()) from either the transformers 4 or 5 config layout."""
    params = hf.get('rope_parameters') or {}
    scaling = hf.get('rope_scaling') or params
    theta = float(params.get('rope_theta', hf.get('rope_theta', 10000.0)))
    kind = scaling.get('rope_type', scaling.get('type', 'default')) if scaling else 'default'
    if kind == 'default':
        return theta, ()
    if kind != 'llama3':
        raise ValueError(f'config.json: rope type {kind!r} is not supported (default or llama3)')
    return theta, (float(scaling['factor']), float(scaling['low_freq_factor']), float(scaling['high_freq_factor']),
                   int(scaling['original_max_position_embeddings']))


def config_from_hf(hf: Mapping, source: str = 'config.json', **overrides):
    kind = hf.get('model_type')
    if kind not in MODEL_TYPES:
        raise ValueError(f'{source}: model_type={kind!r}; decoder-only models supported: {sorted(MODEL_TYPES)}')
    if kind == 'llama' and (hf.get('attention_bias') or hf.get('mlp_bias')):
        raise ValueError(f'{source}: Llama with attention_bias/mlp_bias is not supported')
    act = hf.get('hidden_activation') or hf.get('hidden_act', 'silu')
    if kind == 'gemma':
        act = 'gelu_pytorch_tanh'   # HF Gemma runs the tanh GELU whatever hidden_act says
    if act not in ('silu', 'gelu_pytorch_tanh'):
        raise ValueError(f'{source}: activation {act!r} is not supported (silu or gelu_pytorch_tanh)')
    theta, scaling = _rope(hf)
    heads = hf['num_attention_heads']
    fields = dict(vocab_size=hf['vocab_size'], emb_dim=hf['hidden_size'], num_layers=hf['num_hidden_layers'],
                  num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads,
                  head_dim=hf.get('head_dim') or hf['hidden_size'] // heads, mlp_dim=hf['intermediate_size'],
                  activation='silu' if act == 'silu' else 'gelu_tanh', norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
                  norm_plus_one=kind == 'gemma', scale_embeddings=kind == 'gemma',
                  tie_embeddings=bool(hf.get('tie_word_embeddings', kind == 'gemma')), qkv_bias=kind == 'qwen2',
                  rope_theta=theta, rope_scaling=scaling)
    return DecoderConfig(**{**fields, **overrides})


def model_type(config) -> str:
    if config.norm_plus_one or config.scale_embeddings:
        return 'gemma'
    return 'qwen2' if config.qkv_bias else 'llama'


def config_to_hf(config, ids=None) -> dict:
    """config.json content; ids: the exported tokenizer's special ids (hf_tokenizer.TokenIds; default T5's 0/1)."""
    start, eos, pad = (PAD_ID, EOS_ID, PAD_ID) if ids is None else (ids.start, ids.eos, ids.pad)
    kind = model_type(config)
    hf = {'model_type': kind, 'architectures': [MODEL_TYPES[kind]], 'vocab_size': config.vocab_size,
          'hidden_size': config.emb_dim, 'num_hidden_layers': config.num_layers,
          'num_attention_heads': config.num_heads, 'num_key_value_heads': config.num_kv_heads,
          'head_dim': config.head_dim, 'intermediate_size': config.mlp_dim, 'rms_norm_eps': config.norm_eps,
          'tie_word_embeddings': config.tie_embeddings, 'rope_theta': config.rope_theta,
          'hidden_act': 'silu' if config.activation == 'silu' else 'gelu_pytorch_tanh',
          'torch_dtype': config.param_dtype, 'bos_token_id': start, 'eos_token_id': eos,
          'pad_token_id': pad}
    if config.rope_scaling:
        factor, low, high, original = config.rope_scaling
        hf['rope_scaling'] = {'rope_type': 'llama3', 'factor': factor, 'low_freq_factor': low,
                              'high_freq_factor': high, 'original_max_position_embeddings': original}
    if kind == 'gemma':
        hf['hidden_activation'] = 'gelu_pytorch_tanh'
    return hf


def load(path: str, hf_config: Mapping, weights: dict, **config_overrides):
    """(DecoderConfig, params) from an HF config dict and its {name: array} weights; mismatches named."""
    config = config_from_hf(hf_config, source=os.path.join(path, 'config.json'), **config_overrides)
    names = hf_name_map(config)
    if config.tie_embeddings and 'lm_head.weight' in weights:
        if not np.array_equal(weights['lm_head.weight'], weights['model.embed_tokens.weight']):
            raise ValueError(f'{path}: tie_word_embeddings is set but lm_head.weight differs from the embedding')
        del weights['lm_head.weight']
    param_check.check_names(weights, hf_name_map, config, source=path, rename=CONFIG_KEYS,
                            ignored=lambda n: n.endswith(_IGNORED_SUFFIXES))
    dtype = np.dtype(config.param_dtype) if config.param_dtype != 'bfloat16' else _bfloat16()
    flat = {}
    for hf_name, (ours, transpose) in names.items():
        value = np.asarray(weights.pop(hf_name), dtype=np.float32)
        flat[ours] = np.ascontiguousarray(value.T if transpose else value).astype(dtype)
    param_check.check_params(flat, config, source=path, rename=CONFIG_KEYS)
    return config, unflatten(flat)


def _bfloat16():
    return np.dtype(ml_dtypes.bfloat16)


def export(config, params: Mapping, out_dir: str, ids=None) -> str:
    """config.json + model.safetensors that transformers' *ForCausalLM loads (ids: see config_to_hf)."""
    if config.prefix_lm:
        logging.warning('export_hf: this decoder is a prefix LM (bidirectional attention over the prompt); HF '
                        '%s attends causally, so its outputs differ from ours', MODEL_TYPES[model_type(config)])
    flat = {p: np.asarray(a) for p, a in flatten(params).items()}
    tensors = {}
    for hf_name, (ours, transpose) in hf_name_map(config).items():
        if ours not in flat:
            raise ValueError(f'export_hf: params have no {ours!r} (config {config})')
        tensors[hf_name] = np.ascontiguousarray(flat[ours].T if transpose else flat[ours])
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(config_to_hf(config, ids), f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
    return out_dir
