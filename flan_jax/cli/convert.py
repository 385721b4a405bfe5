"""`flan-jax convert`: checkpoint formats (T5X, ours, Hugging Face), and a PEFT run merged into its base."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from flan_jax.checkpoints import export_hf
from flan_jax.checkpoints.convert import DESTINATIONS, SOURCES, config_from_hf_file, convert
from flan_jax.cli import train as train_main
from flan_jax.models import T5Config
from flan_jax.train import peft_state, restore


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog='flan-jax convert', description=__doc__)
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
    if argv is not None and "--merge-peft" in argv:
        return merge_main(argv)
    args = build_parser().parse_args(argv)
    config = None
    if args.hf_config:
        config = config_from_hf_file(args.hf_config)
    if args.preset:
        config = T5Config.preset(args.preset)
    try:
        out = convert(args.src_format, args.dst_format, args.src, args.dst, config=config)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f'flan-jax convert: {e}', file=sys.stderr)
        return 1
    print(f'wrote {out}')
    return 0



MERGE_USAGE = ("flan-jax convert --merge-peft [--to orbax|hf] --gin_file=RUN.gin [--gin.NAME=value ...] "
               "[--checkpoint=PEFT_CHECKPOINT] OUT")


def merge_main(argv) -> int:
    """`flan-jax convert --merge-peft`: a PEFT run (its config.gin, checkpoint and recorded base) to a base-shaped
    checkpoint, ours (`--to orbax`, default) or Hugging Face (`--to hf`)."""
    args = [a for a in argv if a != "--merge-peft"]
    dst_format = "orbax"
    for i, a in enumerate(list(args)):
        if a == "--to" and i + 1 < len(args):
            dst_format = args[i + 1]
            del args[i:i + 2]
            break
        if a.startswith("--to="):
            dst_format = a.split("=", 1)[1]
            del args[i]
            break
    if not args or args[-1].startswith("-") or dst_format not in ("orbax", "hf"):
        print(f"usage: {MERGE_USAGE}", file=sys.stderr)
        return 2
    out, rest = args[-1], args[:-1]
    try:
        flags, cfg = train_main.load_config(rest)
        if not peft_state.enabled(cfg.model):
            raise ValueError("the gin config sets no train.peft: nothing to merge (give the PEFT run's config.gin)")
        base_cfg, merged, step = restore.merged_params(cfg, flags.checkpoint)
        if dst_format == "hf":
            written = export_hf(base_cfg, merged, out)
        else:
            written = peft_state.save_merged(base_cfg, merged, step, out, flags.checkpoint or cfg.model_dir)
    except (ValueError, FileNotFoundError, train_main.ConfigError) as e:
        print(f"flan-jax convert --merge-peft: {e}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0
