"""`flan-jax compile`: ahead-of-time compile of a run config's train step for a TPU topology, on any host.

    flan-jax compile --gin_file=gin_configs/runs/flan_t5_base_finetune.gin [--gin.NAME=value ...] [--module M]
        --topology=v5e:2x2 [--num_slices=N] [--quick] [--json FILE] [--save_executable DIR] [--suggest]

Prints, per chip: parameter, optimizer-state, gradient (estimate), batch, temporary and generated-code GiB, the total
against the chip's HBM with the headroom, and fits / does not fit; compiled FLOPs against the model's FLOPs per
step; collectives by kind; compile seconds; for a program that does not fit, the compiler's own reason and the
largest buffers it names. --suggest searches global batch, remat policy and mesh split (fsdp, model axis) for the
largest setting that fits with 10% headroom. --quick compiles with XLA's lowest execution-time optimization effort
(train.compile_effort=-1): several times faster, for a program that may take somewhat more memory than the default
one (docs/tpu-fit.md compares the two). --save_executable DIR writes the compiled step (when it fits) for a launch
on the slice to load instead of compiling: `--gin.train.compiled_step_dir="'DIR'"` (train/executable.py).
Needs libtpu (pip install 'flan_jax[tpu]'); no TPU is used.
Exit status: 0 fits, 1 does not fit (or --suggest found nothing), 2 a configuration or topology error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import jax

from flan_jax.cli import train as cli_train
from flan_jax.train import compile as compile_lib
from flan_jax.utils.user_modules import import_modules


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flan-jax compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:2x2, v5e:4x4, v5p:2x2x2, v4:2x2x1")
    p.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN (data parallel across them)")
    p.add_argument("--quick", action="store_true",
                   help="compile with train.compile_effort=-1: several times faster; may need somewhat more memory")
    p.add_argument("--json", default=None, help="also write the report (or the --suggest trials) here as JSON")
    p.add_argument("--save_executable", default=None,
                   help="write the compiled step here (train.compiled_step_dir loads it on the slice)")
    p.add_argument("--suggest", action="store_true",
                   help="search batch, remat and mesh split for the largest setting that fits with 10%% headroom")
    p.add_argument("--max_trials", type=int, default=8, help="--suggest: at most this many compiles")
    p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    p.add_argument("--module", action="append", default=[], help="task-registration module to import (repeatable)")
    return p


def load_config(gin_argv: Sequence[str]):
    """TrainConfig from gin flags (--gin_file, --gin.NAME=value, --gin_bindings, --module), as `flan-jax train` reads
    them; the mesh is checked against the topology later, not against this host's devices."""
    args = cli_train.parse_flags(gin_argv)
    import_modules(args.module)
    cli_train.configure_gin(args)
    return cli_train.train_config()


def _one_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else repr(e)


def _write_json(path: str, payload) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")


def _run(args, cfg) -> int:
    if args.quick:
        cfg = compile_lib.with_settings(cfg, compile_effort=-1.0)
    print(f"flan-jax compile: {', '.join(args.gin_file)} for {args.topology}", flush=True)
    if args.suggest:
        best, trials = compile_lib.suggest(cfg, args.topology, args.num_slices, max_trials=args.max_trials,
                                           log=lambda line: print(line, flush=True))
        if args.json:
            _write_json(args.json, {"best": best, "trials": [{"settings": s, "report": r.to_dict()}
                                                             for s, r in trials]})
        print(f"suggested: {best}" if best else "suggested: nothing tried fits with 10% headroom")
        return 0 if best else 1
    report = compile_lib.compile_train_step(cfg, args.topology, args.num_slices, save_executable=args.save_executable)
    print(compile_lib.summary(report))
    if args.save_executable and report.fits:
        print(f"saved the compiled step in {args.save_executable}: train with "
              f"--gin.train.compiled_step_dir=\"'{args.save_executable}'\"")
    if args.json:
        _write_json(args.json, report.to_dict())
    return 0 if report.fits else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, gin_argv = _parser().parse_known_args(argv)
    # No local accelerator is used: keep libtpu from claiming (or probing for) a local TPU, unless asked otherwise.
    if "JAX_PLATFORMS" not in os.environ:
        try:
            jax.config.update("jax_platforms", "cpu")
        except RuntimeError:   # backends already started (a call from Python): nothing left to keep from starting
            pass
    try:
        compile_lib.topology_devices(args.topology, args.num_slices)
        cfg = load_config([f"--gin_file={f}" for f in args.gin_file]
                          + [f"--module={m}" for m in args.module] + gin_argv)
        return _run(args, cfg)
    except compile_lib.TopologyError as e:
        print(f"flan-jax compile: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        print(f"flan-jax compile: config error: {_one_line(e)}", file=sys.stderr)
        return 2
