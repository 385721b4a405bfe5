"""Checkpoint conversion: T5X (legacy or orbax), our training checkpoints, or HF in; HF or T5X-style orbax out.

    flan-jax convert --from t5x|hf --to hf|orbax IN OUT

A PEFT run merged into base shapes (LoRA): `flan-jax convert --merge-peft ...` (flan_jax/train/peft.py, merge_main).
`--from t5x` also takes our own training checkpoints (MODEL_DIR/checkpoint_<N>, MODEL_DIR/best, or MODEL_DIR for
its latest): their params are read without the optimizer state, with the model config the checkpoint records.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from flan_jax.checkpoints.hf import export_hf, load_hf
from flan_jax.checkpoints import trained
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
    import json
    import os
    from flan_jax.checkpoints import hf, hf_decoder
    file = os.path.join(path, 'config.json') if os.path.isdir(path) else path
    with open(file) as f:
        hf_config = json.load(f)
    if hf_config.get('model_type') in hf_decoder.MODEL_TYPES:
        return hf_decoder.config_from_hf(hf_config, source=file)
    return hf.config_from_hf(hf_config, source=file)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog='flan-jax convert', description=__doc__.splitlines()[0])
    parser.add_argument('--from', dest='src_format', choices=SOURCES, required=True)
    parser.add_argument('--to', dest='dst_format', choices=DESTINATIONS, required=True)
    parser.add_argument('--preset', default=None,
                        help='T5Config preset (tiny/small/base/large/xl/xxl) to validate a T5X source against')
    parser.add_argument('--hf_config', default=None,
                        help='HF config.json (or its directory) describing a T5X/orbax source, e.g. the HF checkpoint '
                             'a decoder-only model was finetuned from (its shapes alone do not fix RoPE or norms)')
    parser.add_argument('src', metavar='IN')
    parser.add_argument('dst', metavar='OUT')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    config = None
    if args.hf_config:
        config = config_from_hf_file(args.hf_config)
    if args.preset:
        from flan_jax.models import T5Config
        config = T5Config.preset(args.preset)
    try:
        out = convert(args.src_format, args.dst_format, args.src, args.dst, config=config)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f'flan-jax convert: {e}', file=sys.stderr)
        return 1
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
