"""Checkpoint conversion: T5X (legacy or orbax), our training checkpoints, or HF in; HF or T5X-style orbax out.

    flan-jax convert --from t5x|hf --to hf|orbax IN OUT   (flan_jax/cli/convert.py)

A PEFT run merged into base shapes (LoRA): `flan-jax convert --merge-peft ...` (train/peft_state.py, merged_params).
`--from t5x` also takes our own training checkpoints (MODEL_DIR/checkpoint_<N>, MODEL_DIR/best, or MODEL_DIR for
its latest): their params are read without the optimizer state, with the model config the checkpoint records; an HF
export of one also holds the run's tokenizer (hf_tokenizer.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from flan_jax.checkpoints import hf, hf_decoder, hf_tokenizer
from flan_jax.checkpoints.hf import export_hf, load_hf
from flan_jax.checkpoints import run_dir as trained
from flan_jax.checkpoints.t5x import infer_config, load_t5x, save_orbax_params

SOURCES = ('t5x', 'hf')
DESTINATIONS = ('hf', 'orbax')


@dataclasses.dataclass(frozen=True)
class Converted:
    path: str
    config: Any
    params: Any              # as written: vocabulary rows in an HF tokenizer's own ids
    vocabulary: Optional[Any]   # the tokenizer written (None: the source did not tell which)


def convert(src_format: str, dst_format: str, src: str, dst: str, *, config=None, vocabulary=None) -> str:
    """Convert the checkpoint at `src` into `dst`; returns the written path (see convert_checkpoint)."""
    return convert_checkpoint(src_format, dst_format, src, dst, config=config, vocabulary=vocabulary).path


def convert_checkpoint(src_format: str, dst_format: str, src: str, dst: str, *, config=None,
                       vocabulary=None) -> Converted:
    """Convert the checkpoint at `src` into `dst`.

    config: T5Config or DecoderConfig for a T5X source (needed for a decoder) (default: the config a training
    checkpoint records, else inferred from the parameter shapes; fields shapes cannot tell - layer_norm_epsilon,
    relative_attention_max_distance - take T5 1.1 defaults). T5X -> orbax keeps the step and Adafactor slots; HF
    sources and our training checkpoints (optax state) carry none over.
    vocabulary: the tokenizer an HF export writes (default: a training checkpoint's own, see
    run_dir.trained_vocabulary; an HF source's tokenizer files are copied).
    """
    if src_format not in SOURCES:
        raise ValueError(f'convert: source format {src_format!r} not in {SOURCES}')
    if dst_format not in DESTINATIONS:
        raise ValueError(f'convert: destination format {dst_format!r} not in {DESTINATIONS}')
    step, slots = None, None
    if src_format == 't5x' and trained.find_trained_checkpoint(src) is not None:
        config, params, step = trained.load_trained(src, config)
        vocabulary = vocabulary if vocabulary is not None else trained.trained_vocabulary(src)
    elif src_format == 't5x':
        params, opt = load_t5x(src, with_optimizer_state=True, config=config)
        step, slots = opt['step'], opt['slots']
        config = config if config is not None else infer_config(params)
    else:
        config, params = load_hf(src)
    if dst_format == 'orbax':
        return Converted(save_orbax_params(params, dst, step=step, slots=slots), config, params, None)
    path = export_hf(config, params, dst, vocabulary=vocabulary)
    if vocabulary is None and src_format == 'hf' and os.path.abspath(src) != os.path.abspath(dst):
        hf_tokenizer.copy_tokenizer_files(src, dst)
    return Converted(path, config, params, vocabulary)


def config_from_hf_file(path: str):
    """T5Config or DecoderConfig from an HF config.json (or the directory holding one)."""
    file = os.path.join(path, 'config.json') if os.path.isdir(path) else path
    with open(file) as f:
        hf_config = json.load(f)
    if hf_config.get('model_type') in hf_decoder.MODEL_TYPES:
        return hf_decoder.config_from_hf(hf_config, source=file)
    return hf.config_from_hf(hf_config, source=file)
