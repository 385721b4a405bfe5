"""Checkpoint conversion: T5X (legacy or orbax), our training checkpoints, or HF in; HF or T5X-style orbax out.

    flan-jax convert --from t5x|hf --to hf|orbax IN OUT   (flan_jax/cli/convert.py)

A PEFT run merged into base shapes (LoRA): `flan-jax convert --merge-peft ...` (train/peft_state.py, merged_params).
`--from t5x` also takes our own training checkpoints (MODEL_DIR/checkpoint_<N>, MODEL_DIR/best, or MODEL_DIR for
its latest): their params are read without the optimizer state, with the model config the checkpoint records.
"""
from __future__ import annotations

import json
import os

from flan_jax.checkpoints import hf, hf_decoder
from flan_jax.checkpoints.hf import export_hf, load_hf
from flan_jax.checkpoints import run_dir as trained
from flan_jax.checkpoints.t5x import infer_config, load_t5x, save_orbax_params

SOURCES = ('t5x', 'hf')
DESTINATIONS = ('hf', 'orbax')


def convert(src_format: str, dst_format: str, src: str, dst: str, *, config=None) -> str:
    """Convert the checkpoint at `src` into `dst`; returns the written path.

    config: T5Config or DecoderConfig for a T5X source (needed for a decoder) (default: the config a training
    checkpoint records, else inferred from the parameter shapes; fields shapes cannot tell - layer_norm_epsilon,
    relative_attention_max_distance - take T5 1.1 defaults). T5X -> orbax keeps the step and Adafactor slots; HF
    sources and our training checkpoints (optax state) carry none over.
    """
    if src_format not in SOURCES:
        raise ValueError(f'convert: source format {src_format!r} not in {SOURCES}')
    if dst_format not in DESTINATIONS:
        raise ValueError(f'convert: destination format {dst_format!r} not in {DESTINATIONS}')
    step, slots = None, None
    if src_format == 't5x' and trained.find_trained_checkpoint(src) is not None:
        config, params, step = trained.load_trained(src, config)
    elif src_format == 't5x':
        params, opt = load_t5x(src, with_optimizer_state=True, config=config)
        step, slots = opt['step'], opt['slots']
        config = config if config is not None else infer_config(params)
    else:
        config, params = load_hf(src)
    if dst_format == 'hf':
        return export_hf(config, params, dst)
    return save_orbax_params(params, dst, step=step, slots=slots)


def config_from_hf_file(path: str):
    """T5Config or DecoderConfig from an HF config.json (or the directory holding one)."""
    file = os.path.join(path, 'config.json') if os.path.isdir(path) else path
    with open(file) as f:
        hf_config = json.load(f)
    if hf_config.get('model_type') in hf_decoder.MODEL_TYPES:
        return hf_decoder.config_from_hf(hf_config, source=file)
    return hf.config_from_hf(hf_config, source=file)
