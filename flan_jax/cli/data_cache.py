"""`flan-jax data cache NAME --output DIR`: render and tokenize every task of a mixture (or one task) into a
preprocessed cache with an Apache Beam job (flan_jax.pipeline.cache.build; layout in flan_jax.pipeline.cache.format).

  flan-jax data cache NAME --output DIR [--splits train,validation] [--num_shards N]
      [--feature_lengths inputs=N,targets=M] [--runner DirectRunner] [--direct_num_workers 2]
      [--direct_running_mode multi_processing] [--module M ...] [-- BEAM_PIPELINE_OPTIONS ...]

Prints one line per task (status per split, examples, tokens, truncated, skipped records) and a summary line; exits
with 0 when every split was built or already cached, 1 when some task failed (the others are still committed), 2 on
bad arguments.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence, TextIO

from flan_jax.pipeline.cache import build
from flan_jax.pipeline.cache import format as fmt
from flan_jax.tasks import cot, niv2, t0

PROG = "flan-jax data cache"


def split_pipeline_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(arguments of `data`, Beam pipeline options after `--`) of a `cache` command line; others pass unchanged."""
    argv = list(argv)
    if argv and argv[0] == "cache" and "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1:]
    return argv, []


def add_parser(sub, parents: Sequence[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", parents=list(parents), help="preprocess a mixture into an ArrayRecord cache (Beam)")
    p.add_argument("name", help="seqio task or mixture name")
    p.add_argument("--output", required=True, help="cache directory (created if missing)")
    p.add_argument("--splits", default=None, help="comma-separated splits (default: every split of each task)")
    p.add_argument("--num_shards", type=int, default=None,
                   help=f"shards per task and split (default: declared examples / {build.EXAMPLES_PER_SHARD:,})")
    p.add_argument("--feature_lengths", default=None, help="truncate to inputs=N,targets=M (default: no truncation)")
    p.add_argument("--runner", default="DirectRunner", help="Beam runner (extra pipeline options go after --)")
    p.add_argument("--direct_num_workers", type=int, default=2)
    p.add_argument("--direct_running_mode", default="multi_processing",
                   choices=("in_memory", "multi_threading", "multi_processing"))


def parse_feature_lengths(text: str) -> dict[str, int]:
    lengths = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in ("inputs", "targets") or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--feature_lengths: expected inputs=N,targets=M, got {item!r}")
        lengths[key.strip()] = int(value)
    if not lengths:
        raise ValueError(f"--feature_lengths: expected inputs=N,targets=M, got {text!r}")
    return lengths


def _worker_modules(args) -> list[str]:
    """What each Beam worker imports to see the launcher's tasks: the registrations and the --module list. The
    collection folders given as options go to the environment, which local workers inherit (remote ones need the
    same variables set)."""
    for value, variable in ((args.promptsource_dir, t0.ENV_PROMPTSOURCE_DIR), (args.t0_data_dir, t0.ENV_DATA_DIR),
                            (args.niv2_dir, niv2.ENV_NIV2_DIR), (args.cot_dir, cot.ENV_COT_DIR)):
        if value:
            os.environ[variable] = os.path.abspath(value)
    return ["flan_jax.tasks", *(os.path.abspath(m) if m.endswith(".py") else m for m in args.module)]


def _count(counts: dict) -> str:
    return "/".join(str(counts.get(k, 0)) for k in build.LENGTH_KEYS)


def _task_line(task: str, splits: dict) -> str:
    parts, examples, tokens, truncated, skipped = [], 0, {}, {}, 0
    for split, result in splits.items():
        status = result["status"]
        parts.append(f"{split}={'cached' if status == 'skipped' else status}")
        if status != "failed":
            examples += result["examples"]
            for key in build.LENGTH_KEYS:
                tokens[key] = tokens.get(key, 0) + result["tokens"].get(key, 0)
                truncated[key] = truncated.get(key, 0) + result["truncated"].get(key, 0)
            skipped += sum(result["skipped"].values())
    return (f"{task}\t{' '.join(parts)}\texamples={examples}\ttokens={_count(tokens)}\t"
            f"truncated={_count(truncated)}\tskipped_records={skipped}")


def cmd_cache(args, out: TextIO) -> int:
    try:
        lengths = parse_feature_lengths(args.feature_lengths) if args.feature_lengths is not None else None
        splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits is not None else None
        if splits is not None and not splits:
            raise ValueError(f"--splits: expected a comma-separated list, got {args.splits!r}")
        if args.direct_num_workers < 1:
            raise ValueError(f"--direct_num_workers {args.direct_num_workers}: must be at least 1")
        report = build.build_cache(
            args.name, args.output, splits=splits, num_shards=args.num_shards, feature_lengths=lengths,
            modules=_worker_modules(args), runner=args.runner, num_workers=args.direct_num_workers,
            running_mode=args.direct_running_mode, pipeline_args=getattr(args, "pipeline_args", []))
    except (ValueError, fmt.CacheError) as e:  # bad arguments: one line, no traceback
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    print("task\tsplits\texamples\ttokens (inputs/targets)\ttruncated (inputs/targets)\tskipped records", file=out)
    for task, task_splits in sorted(report["tasks"].items()):
        print(_task_line(task, task_splits), file=out)
        for split, result in task_splits.items():
            if result["status"] == "failed":
                print(f"{PROG}: {task} [{split}] failed: {result['reason']}", file=sys.stderr)
    totals = report["totals"]
    print(f"# {args.output}: {len(report['tasks'])} task(s); splits built {totals['built']}, cached (skipped) "
          f"{totals['skipped']}, failed {totals['failed']}; built {totals['examples']} examples, "
          f"{totals['tokens']} tokens", file=out)
    return 1 if totals["failed"] else 0
