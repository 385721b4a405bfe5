"""`flan-jax convert`: checkpoint formats (T5X, ours, Hugging Face), and a PEFT run merged into its base."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import numpy as np

from flan_jax import models
from flan_jax.checkpoints import export_hf, hf_tokenizer, hf_verify
from flan_jax.checkpoints.convert import DESTINATIONS, SOURCES, Converted, config_from_hf_file, convert_checkpoint
from flan_jax.cli import train as train_main
from flan_jax.evaluation import inference
from flan_jax.models import T5Config
from flan_jax.pipeline import batches as data_lib
from flan_jax.train import peft_state, restore

VERIFY_NEW_TOKENS = 32


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog='flan-jax convert', description=__doc__)
    parser.add_argument('--from', dest='src_format', choices=SOURCES, required=True)
    parser.add_argument('--to', dest='dst_format', choices=DESTINATIONS, required=True)
    parser.add_argument('--preset', default=None,
                        help='T5Config preset (tiny/small/base/large/xl/xxl) to validate a T5X source against')
    parser.add_argument('--hf_config', default=None,
                        help='HF config.json (or its directory) describing a T5X/orbax source, e.g. the HF checkpoint '
                             'a decoder-only model was finetuned from (its shapes alone do not fix RoPE or norms)')
    parser.add_argument('--vocabulary', default=None,
                        help="the tokenizer an HF export writes: 'byte', a SentencePiece .model or an HF tokenizer "
                             "file/directory (default: a training run's own, MODEL_DIR/vocabulary.model or recorded)")
    parser.add_argument('--verify', action='store_true',
                        help='after an HF export, load it with transformers (the hf extra) and check that its '
                             'tokenizer and greedy generate reproduce our ids and greedy decoding on a few prompts')
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
    if args.verify and args.dst_format != 'hf':
        print('flan-jax convert: --verify checks an HF export (--to hf)', file=sys.stderr)
        return 2
    try:
        vocabulary = hf_tokenizer.open_vocabulary(args.vocabulary) if args.vocabulary else None
        done = convert_checkpoint(args.src_format, args.dst_format, args.src, args.dst, config=config,
                                  vocabulary=vocabulary)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f'flan-jax convert: {e}', file=sys.stderr)
        return 1
    print(f'wrote {done.path}')
    if args.dst_format == 'hf' and done.vocabulary is None and args.src_format != 'hf':
        print('no tokenizer written: the source does not say which vocabulary it was trained with (--vocabulary)')
    return verify_export(done) if args.verify else 0


def verify_export(done: Converted) -> int:
    """`--verify`: 0 when transformers reproduces our tokenization and greedy decoding of the export, else 1."""
    if done.vocabulary is None:
        print('flan-jax convert --verify: no vocabulary to verify with (--vocabulary)', file=sys.stderr)
        return 1
    try:
        report = hf_verify.verify(done.path, done.vocabulary, hf_verify.PROMPTS, our_greedy(done),
                                  encoder_decoder=models.is_encoder_decoder(done.config),
                                  max_new_tokens=VERIFY_NEW_TOKENS)
    except hf_verify.MissingDependency as e:
        print(f'flan-jax convert --verify: {e}', file=sys.stderr)
        return 1
    print(report.verdict())
    return 0 if report.ok else 1


def our_greedy(done: Converted, max_new_tokens: int = VERIFY_NEW_TOKENS):
    """texts -> generated ids (our vocabulary, up to EOS): prompts encoded and decoded as `flan-jax eval` does."""
    params = hf_tokenizer.rows_in_our_ids(done.config, done.params, done.vocabulary)
    model = inference.InferenceModel(done.config, params, done.vocabulary)

    def run(texts):
        rows, _ = inference.encode_prompts(model.vocabulary, texts, 1 << 30)   # whole prompts, none cut
        tokens = inference.pad_rows(rows, max(len(r) for r in rows), model.ids.pad)
        out = np.asarray(model.greedy(tokens, max_new_tokens))
        return [inference.cut_at_eos(row, model.ids.eos)[0] for row in out]
    return run


MERGE_USAGE = ("flan-jax convert --merge-peft [--to orbax|hf [--verify]] --gin_file=RUN.gin [--gin.NAME=value ...] "
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
    verify = "--verify" in args
    args = [a for a in args if a != "--verify"]
    if not args or args[-1].startswith("-") or dst_format not in ("orbax", "hf") or (verify and dst_format != "hf"):
        print(f"usage: {MERGE_USAGE}", file=sys.stderr)
        return 2
    out, rest = args[-1], args[:-1]
    try:
        flags, cfg = train_main.load_config(rest)
        if not peft_state.enabled(cfg.model):
            raise ValueError("the gin config sets no train.peft: nothing to merge (give the PEFT run's config.gin)")
        base_cfg, merged, step = restore.merged_params(cfg, flags.checkpoint)
        if dst_format == "hf":   # the tokenizer from the run's task; rows into its ids
            vocab = data_lib.targets_vocabulary(cfg.input)
            merged = hf_tokenizer.rows_in_tokenizer_ids(base_cfg, merged, vocab)
            written = export_hf(base_cfg, merged, out, vocabulary=vocab)
        else:
            written = peft_state.save_merged(base_cfg, merged, step, out, flags.checkpoint or cfg.model_dir)
    except (ValueError, FileNotFoundError, train_main.ConfigError) as e:
        print(f"flan-jax convert --merge-peft: {e}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return verify_export(Converted(written, base_cfg, merged, vocab)) if verify else 0
