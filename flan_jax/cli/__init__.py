"""`flan-jax COMMAND`: one module per subcommand in this package; this module only dispatches."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Optional, Sequence
from flan_jax.utils.runtime_env import reexec_with_tuned_malloc
import difflib

# Quiet TensorFlow (input pipeline only) before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# name -> (module in flan_jax.cli, function taking argv, one line of help with an example)
COMMANDS = {
    "train": ("train", "main", "train from gin configs (flan-jax train --gin_file=gin_configs/runs/default_cpu.gin)"),
    "eval": ("train", "eval_cli", "evaluate a checkpoint (flan-jax eval --gin_file=RUN/config.gin --checkpoint=RUN)"),
    "data": ("data", "main", "list / show / stats of tasks (flan-jax data list --collection default)"),
    "convert": ("convert", "main", "checkpoint conversion (flan-jax convert --from t5x|hf --to hf|orbax IN OUT; "
                                   "--merge-peft --gin_file=RUN/config.gin OUT)"),
    "compile": ("compile", "main", "ahead-of-time compile for a TPU topology: memory, FLOPs, fit "
                                   "(flan-jax compile --gin_file=... --topology=v5e:2x2)"),
    "eval-suite": ("eval_suite", "main", "BBH / MMLU / TyDiQA / MGSM (flan-jax eval-suite run --suite bbh ...)"),
    "preference": ("preference", "main", "reward model / DPO after SFT "
                                         "(flan-jax preference --gin_file=gin_configs/runs/dpo_default_cpu.gin)"),
    "ppo": ("ppo", "main", "PPO after SFT (flan-jax ppo --gin_file=gin_configs/runs/ppo_rule_cpu.gin)"),
    "self-instruct": ("self_instruct", "main", "generate instruction data "
                                               "(flan-jax self-instruct --gin_file=... --checkpoint=... --out=DIR)"),
}


def usage() -> str:
    lines = ["usage: flan-jax COMMAND [flags]   (flan-jax COMMAND --help for its flags)",
             "train, eval, data, compile, preference and ppo take --module NAME (repeatable): import your "
             "task-registration module first", "", "commands:"]
    lines += [f"    {name:<14}{help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    if argv is None:  # a real command line (not a call from Python): restart once with the tuned malloc
        reexec_with_tuned_malloc(["-m", "flan_jax.cli", *sys.argv[1:]])
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"flan-jax: unknown command {command!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[command]
    return getattr(importlib.import_module(f"flan_jax.cli.{module}"), function)(rest)
