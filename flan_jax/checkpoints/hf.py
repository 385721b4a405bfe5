"""Import and export Hugging Face T5 1.1 checkpoints (`T5ForConditionalGeneration.save_pretrained` dirs).

Name mapping (HF -> T5X), with HF Linear weights stored [out, in] and therefore transposed:
    shared                                   -> token_embedder/embedding          (same layout)
    {enc,dec}.block.0.layer.0.SelfAttention.relative_attention_bias [buckets, heads]
                                             -> {enc,dec}/relpos_bias/rel_embedding [heads, buckets]
    encoder.block.N.layer.0.SelfAttention.{q,k,v,o}   -> encoder/layers_N/attention/{query,key,value,out}
    encoder.block.N.layer.{0,1}.layer_norm   -> pre_attention_layer_norm, pre_mlp_layer_norm
    encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo} -> encoder/layers_N/mlp/{wi_0,wi_1,wo}
    decoder.block.N.layer.0 SelfAttention / layer.1 EncDecAttention / layer.2 DenseReluDense
                                             -> self_attention / encoder_decoder_attention / mlp
    {encoder,decoder}.final_layer_norm       -> encoder/encoder_norm, decoder/decoder_norm
    lm_head                                  -> decoder/logits_dense/kernel
HF ties lm_head to `shared` when the checkpoint omits it; T5 1.0-style configs also scale the decoder
output by d_model**-0.5, which is folded into logits_dense here.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Mapping

import numpy as np

from flan_jax.checkpoints import hf_decoder, hf_tokenizer, param_check
from flan_jax.checkpoints.hf_tokenizer import TokenIds
from flan_jax.checkpoints.t5x import check_params, flatten, unflatten
from flan_jax.models import T5Config
from safetensors.numpy import load_file
import ml_dtypes
from safetensors.numpy import save_file
from flan_jax.models import is_encoder_decoder
from flan_jax.data.vocabularies import EOS_ID, PAD_ID

_ATTENTION = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out'}
_MLP = ('wi_0', 'wi_1', 'wo')
_GATED_GELU = ('gated-gelu', 'gated-gelu_new')
_RELPOS = 'block.0.layer.0.SelfAttention.relative_attention_bias.weight'
# Present in some HF checkpoints, unused by the model (HF ignores it as well).
_IGNORED = ('decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight',)
# Copies of `shared` that HF may or may not write out.
_EMBEDDING_ALIASES = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')
# Our T5Config fields -> the config.json keys a user edits when an HF directory does not match its weights.
CONFIG_KEYS = {'emb_dim': 'd_model', 'mlp_dim': 'd_ff', 'head_dim': 'd_kv', 'num_encoder_layers': 'num_layers'}
# Special ids when the export is given no vocabulary: T5's, which every vocabulary of this package keeps.
DEFAULT_IDS = TokenIds(start=PAD_ID, eos=EOS_ID, pad=PAD_ID)


def hf_name_map(config) -> dict:
    """{HF state-dict name: (T5X flat path, transpose?)} for every HF weight except the lm_head/shared ties."""
    names = {'shared.weight': ('token_embedder/embedding', False),
             f'encoder.{_RELPOS}': ('encoder/relpos_bias/rel_embedding', True),
             f'decoder.{_RELPOS}': ('decoder/relpos_bias/rel_embedding', True),
             'encoder.final_layer_norm.weight': ('encoder/encoder_norm/scale', False),
             'decoder.final_layer_norm.weight': ('decoder/decoder_norm/scale', False),
             'lm_head.weight': ('decoder/logits_dense/kernel', True)}

    def attention(hf_prefix, t5x_prefix):
        for short, long in _ATTENTION.items():
            names[f'{hf_prefix}.{short}.weight'] = (f'{t5x_prefix}/{long}/kernel', True)

    def mlp(hf_prefix, t5x_prefix):
        for w in _MLP:
            names[f'{hf_prefix}.{w}.weight'] = (f'{t5x_prefix}/{w}/kernel', True)

    for i in range(config.num_encoder_layers):
        hf, ours = f'encoder.block.{i}.layer', f'encoder/layers_{i}'
        attention(f'{hf}.0.SelfAttention', f'{ours}/attention')
        names[f'{hf}.0.layer_norm.weight'] = (f'{ours}/pre_attention_layer_norm/scale', False)
        mlp(f'{hf}.1.DenseReluDense', f'{ours}/mlp')
        names[f'{hf}.1.layer_norm.weight'] = (f'{ours}/pre_mlp_layer_norm/scale', False)
    for i in range(config.num_decoder_layers):
        hf, ours = f'decoder.block.{i}.layer', f'decoder/layers_{i}'
        attention(f'{hf}.0.SelfAttention', f'{ours}/self_attention')
        names[f'{hf}.0.layer_norm.weight'] = (f'{ours}/pre_self_attention_layer_norm/scale', False)
        attention(f'{hf}.1.EncDecAttention', f'{ours}/encoder_decoder_attention')
        names[f'{hf}.1.layer_norm.weight'] = (f'{ours}/pre_cross_attention_layer_norm/scale', False)
        mlp(f'{hf}.2.DenseReluDense', f'{ours}/mlp')
        names[f'{hf}.2.layer_norm.weight'] = (f'{ours}/pre_mlp_layer_norm/scale', False)
    return names


# ----------------------------------------------------------------------------------------------
# Config.

def config_from_hf(hf: Mapping, source: str = 'config.json', **overrides):
    """T5Config from an HF T5 config dict; only T5 1.1 (gated-gelu) models are accepted."""
    model_type = hf.get('model_type', 't5')
    if model_type not in ('t5', 'mt5'):
        raise ValueError(f'{source}: model_type={model_type!r}; only T5 1.1 / mT5 (model_type t5 or mt5) is '
                         f'supported (umt5 has per-layer position biases)')
    proj = hf.get('feed_forward_proj', 'relu')
    if proj not in _GATED_GELU:
        raise ValueError(f'{source}: feed_forward_proj={proj!r}; flan_jax implements T5 1.1 which needs '
                         f"'gated-gelu' (original T5 1.0 'relu' checkpoints are not supported)")
    required = ('d_model', 'num_heads', 'd_kv', 'd_ff', 'num_layers', 'vocab_size')
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f'{source}: missing config keys {missing}')
    num_layers = int(hf['num_layers'])
    fields = dict(
        vocab_size=int(hf['vocab_size']), emb_dim=int(hf['d_model']), num_heads=int(hf['num_heads']),
        head_dim=int(hf['d_kv']), mlp_dim=int(hf['d_ff']), num_encoder_layers=num_layers,
        num_decoder_layers=int(hf.get('num_decoder_layers') or num_layers),
        relative_attention_num_buckets=int(hf.get('relative_attention_num_buckets', 32)),
        relative_attention_max_distance=int(hf.get('relative_attention_max_distance', 128)),
        layer_norm_epsilon=float(hf.get('layer_norm_epsilon', 1e-6)),
        dropout_rate=float(hf.get('dropout_rate', 0.0)))
    fields.update(overrides)
    return T5Config(**fields)


def _scales_decoder_output(hf: Mapping) -> bool:
    """HF multiplies the decoder output by d_model**-0.5 for tied (T5 1.0-style) heads.
    transformers 5 records it as scale_decoder_outputs; 4.x derived it from tie_word_embeddings."""
    if 'scale_decoder_outputs' in hf:
        return bool(hf['scale_decoder_outputs'])
    return hf.get('tie_word_embeddings', True) is not False


def config_to_hf(config, ids: TokenIds = DEFAULT_IDS) -> dict:
    """HF config.json content for a T5Config (T5 1.1: gated-gelu, untied head, no output scaling); ids: the special
    ids of the exported tokenizer.

    transformers 5 forces T5Config.tie_word_embeddings to True (reading False as scale_decoder_outputs=False) and warns
    that it keeps the checkpoint's own lm_head; transformers 4 reads tie_word_embeddings=False as written."""
    return {
        'architectures': ['T5ForConditionalGeneration'], 'model_type': 't5',
        'vocab_size': config.vocab_size, 'd_model': config.emb_dim, 'd_kv': config.head_dim,
        'd_ff': config.mlp_dim, 'num_heads': config.num_heads, 'num_layers': config.num_encoder_layers,
        'num_decoder_layers': config.num_decoder_layers,
        'relative_attention_num_buckets': config.relative_attention_num_buckets,
        'relative_attention_max_distance': config.relative_attention_max_distance,
        'dropout_rate': config.dropout_rate, 'layer_norm_epsilon': config.layer_norm_epsilon,
        'initializer_factor': 1.0, 'feed_forward_proj': 'gated-gelu', 'dense_act_fn': 'gelu_new',
        'is_gated_act': True, 'is_encoder_decoder': True, 'tie_word_embeddings': False,
        'scale_decoder_outputs': False, **generation_config(config, ids),
        'use_cache': True, 'dtype': config.param_dtype,
    }


# ----------------------------------------------------------------------------------------------
# Reading weights.

def _load_safetensors(files: list) -> dict:
    weights = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def _load_torch_bin(files: list) -> dict:
    import torch  # lazy: torch is optional (the test/bench extras), only .bin checkpoints need it
    weights = {}
    for f in files:
        # weights_only=True: never unpickle arbitrary objects from a downloaded file.
        state = torch.load(f, map_location='cpu', weights_only=True)
        weights.update({k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()})
    return weights


def read_hf_weights(path: str) -> dict:
    """{name: numpy array} from model.safetensors, pytorch_model.bin, or their sharded *.index.json forms."""
    candidates = [('model.safetensors', _load_safetensors), ('model.safetensors.index.json', _load_safetensors),
                  ('pytorch_model.bin', _load_torch_bin), ('pytorch_model.bin.index.json', _load_torch_bin)]
    for filename, loader in candidates:
        full = os.path.join(path, filename)
        if not os.path.isfile(full):
            continue
        if filename.endswith('.index.json'):
            with open(full) as f:
                weight_map = json.load(f)['weight_map']
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
            if missing:
                raise FileNotFoundError(f'{full}: shard files missing: {missing}')
            return loader([os.path.join(path, s) for s in shards])
        return loader([full])
    raise FileNotFoundError(f'{path}: no model.safetensors, pytorch_model.bin or sharded index found')


def load_hf(path: str, **config_overrides):
    """(T5Config, params) from a HF save_pretrained dir. Params: nested dict of numpy arrays in
    config.param_dtype. Every missing or unexpected weight is reported by name in one ValueError."""
    config_file = os.path.join(path, 'config.json')
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f'{path}: no config.json (expected a HF save_pretrained directory)')
    with open(config_file) as f:
        hf_config = json.load(f)
    if hf_config.get('model_type') in hf_decoder.MODEL_TYPES:   # Llama / Qwen2 / Gemma causal LMs
        return hf_decoder.load(path, hf_config, read_hf_weights(path), **config_overrides)
    config = config_from_hf(hf_config, source=config_file, **config_overrides)
    weights = read_hf_weights(path)
    names = hf_name_map(config)

    if 'shared.weight' not in weights:  # some exports keep only the encoder's copy of the tied embedding
        for alias in _EMBEDDING_ALIASES:
            if alias in weights:
                weights['shared.weight'] = weights[alias]
                break
    scale = config.emb_dim ** -0.5 if _scales_decoder_output(hf_config) else 1.0
    if 'lm_head.weight' not in weights and 'shared.weight' in weights:
        weights['lm_head.weight'] = weights['shared.weight']  # HF ties the head to the embedding

    param_check.check_names(weights, hf_name_map, config, source=path, rename=CONFIG_KEYS,
                            ignored=lambda n: n in _IGNORED + _EMBEDDING_ALIASES)
    for alias in _EMBEDDING_ALIASES:
        if alias in weights and not np.array_equal(weights[alias], weights['shared.weight']):
            raise ValueError(f'{path}: {alias} differs from shared.weight; untied input embeddings are not T5')

    dtype = np.dtype(config.param_dtype) if config.param_dtype != 'bfloat16' else _bfloat16()
    flat = {}
    for hf_name, (ours, transpose) in names.items():
        value = np.asarray(weights.pop(hf_name), dtype=np.float32)  # pop: one copy of the model at a time
        if transpose:
            value = value.T
        if hf_name == 'lm_head.weight' and scale != 1.0:
            value = value * np.float32(scale)
        flat[ours] = np.ascontiguousarray(value).astype(dtype)
    param_check.check_params(flat, config, source=path, rename=CONFIG_KEYS)
    return config, unflatten(flat)


def _bfloat16():
    return np.dtype(ml_dtypes.bfloat16)


# ----------------------------------------------------------------------------------------------
# Writing.

def generation_config(config, ids: TokenIds) -> dict:
    """generation_config.json (also in config.json): the ids greedy decoding starts, ends and pads with."""
    start = 'decoder_start_token_id' if is_encoder_decoder(config) else 'bos_token_id'
    return {start: ids.start, 'eos_token_id': ids.eos, 'pad_token_id': ids.pad}


def export_hf(config, params: Mapping, out_dir: str, *, max_shard_bytes: int = 0, vocabulary=None) -> str:
    """Write a Hugging Face directory: config.json, the weights as safetensors, generation_config.json and, with the
    run's `vocabulary` (a seqio.Vocabulary), its tokenizer (hf_tokenizer.py); special ids are the vocabulary's.

    T5 loads with T5ForConditionalGeneration, decoders with their *ForCausalLM. Weights keep their dtype (float32 /
    bfloat16). max_shard_bytes > 0 splits T5 weights into model-0000i-of-0000n.safetensors files with a
    model.safetensors.index.json, like HF does.
    """
    ids = DEFAULT_IDS if vocabulary is None else hf_tokenizer.token_ids(vocabulary)
    os.makedirs(out_dir, exist_ok=True)
    if is_encoder_decoder(config):
        _export_t5(config, params, out_dir, ids, max_shard_bytes)
    else:
        hf_decoder.export(config, params, out_dir, ids)
    with open(os.path.join(out_dir, 'generation_config.json'), 'w') as f:
        json.dump(generation_config(config, ids), f, indent=2)
    if vocabulary is not None:
        try:
            hf_tokenizer.write_tokenizer(vocabulary, out_dir, encoder_decoder=is_encoder_decoder(config))
        except ImportError as e:   # the weights are still usable; say what the tokenizer needs
            logging.warning('export_hf: no tokenizer written to %s (%s); pip install \'flan_jax[hf]\'', out_dir, e)
    return out_dir


def _export_t5(config, params: Mapping, out_dir: str, ids: TokenIds, max_shard_bytes: int) -> None:
    flat = {p: np.asarray(a) for p, a in flatten(params).items()}
    check_params(flat, config, source='export_hf params')
    tensors = {}
    for hf_name, (ours, transpose) in hf_name_map(config).items():
        value = flat[ours].T if transpose else flat[ours]
        tensors[hf_name] = np.ascontiguousarray(value)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(config_to_hf(config, ids), f, indent=2, sort_keys=True)
    metadata = {'format': 'pt'}  # transformers refuses safetensors files without a format tag
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, os.path.join(out_dir, 'model.safetensors'), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
        save_file(shard, os.path.join(out_dir, filename), metadata=metadata)
        weight_map.update({name: filename for name in shard})
    index = {'metadata': {'total_size': int(sum(t.nbytes for t in tensors.values()))}, 'weight_map': weight_map}
    with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
        json.dump(index, f, indent=2, sort_keys=True)


def _shard(tensors: dict, max_bytes: int) -> list:
    if max_bytes <= 0:
        return [tensors]
    shards, current, size = [], {}, 0
    for name, value in tensors.items():
        if current and size + value.nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = value
        size += value.nbytes
    return shards + [current] if current else shards
