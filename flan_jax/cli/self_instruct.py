"""`flan-jax self-instruct`: generate an instruction dataset with a trained checkpoint (see self_instruct.py).

    flan-jax self-instruct --gin_file=gin_configs/runs/default_cpu.gin --checkpoint=runs/default \\
        --seed_tasks=tasks/self_instruct_seed_tasks.jsonl --out=/tmp/si --num_instructions=100

The gin files and --checkpoint are read exactly as by `flan-jax eval`; the model's vocabulary (a SentencePiece
model) is copied to OUT/vocabulary.model so that `flan_jax.tasks.selfinstruct` tokenizes the data the same way.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence
import seqio
from flan_jax.generation import prompts, self_instruct
from flan_jax.generation.model import TextModel
from flan_jax.cli.train import load_trained_model
from flan_jax.cli.train import ConfigError

DEFAULT_SEED_TASKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                  "tasks", "self_instruct_seed_tasks.jsonl")


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="flan-jax self-instruct", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed_tasks", default=DEFAULT_SEED_TASKS, help="seed task JSONL")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num_instructions", type=int, required=True, help="new instructions to generate")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.5)
    parser.add_argument("--max_instruction_tokens", type=int, default=128)
    parser.add_argument("--max_instance_tokens", type=int, default=128)
    parser.add_argument("--max_input_length", type=int, default=0,
                        help="prompt tokens kept (their end); 0: the config's TASK_FEATURE_LENGTHS['inputs']")
    parser.add_argument("--max_rounds", type=int, default=0, help="rounds of batch_size prompts; 0: automatic")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_known_args(argv)


def run(argv: Sequence[str]) -> dict:


    args, model_flags = parse(argv)
    seeds = prompts.load_seed_tasks(args.seed_tasks)
    cfg = self_instruct.SelfInstructConfig(
        num_instructions=args.num_instructions, temperature=args.temperature, top_p=args.top_p,
        max_instruction_tokens=args.max_instruction_tokens, max_instance_tokens=args.max_instance_tokens,
        max_rounds=args.max_rounds, seed=args.seed)
    train_cfg, params, step, vocab = load_trained_model(model_flags)
    model = TextModel(train_cfg.model, params, vocab,
                      args.max_input_length or train_cfg.input.task_feature_lengths["inputs"], args.batch_size)
    os.makedirs(args.out, exist_ok=True)
    if isinstance(vocab, seqio.SentencePieceVocabulary):
        with open(os.path.join(args.out, "vocabulary.model"), "wb") as f:
            f.write(vocab.sp_model)
    report = self_instruct.run(model, seeds, cfg, args.out)
    report["checkpoint_step"] = step
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        report = run(sys.argv[1:] if argv is None else list(argv))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"flan-jax self-instruct: {e}", file=sys.stderr)
        return 2
    gen, timing, out = report["instruction_generation"], report["timing"], report["output"]
    print(f"instructions: {gen['parsed_instructions']} parsed, {gen['kept_instructions']} kept "
          f"({timing['kept_instructions_per_s']:.2f} instructions/s); output: {out['instructions']} instructions, "
          f"{out['instances']} instances ({timing['output_instructions_per_s']:.2f} instructions/s end to end)")
    print("filters: " + ", ".join(f"{k}={v}" for k, v in {**report["instruction_filters"],
                                                          **report["instance_filters"]}.items()))
    return 0
