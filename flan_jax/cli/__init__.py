"""`flan-jax COMMAND`: one module per subcommand in this package; this module only dispatches."""
from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import os
import sys
from typing import List, Optional, Sequence

from flan_jax.utils import gin_flags
from flan_jax.utils.quiet_stderr import quiet_native_stderr
from flan_jax.utils.runtime_env import reexec_with_tuned_malloc, skip_absent_accelerators

# Library start-up chatter a user cannot act on: TensorFlow/XLA C++ logs, oneDNN notices, gRPC, glog.
QUIET_ENVIRON = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0", "GRPC_VERBOSITY": "ERROR",
                 "GLOG_minloglevel": "2"}
# Python loggers of the same (absl, JAX's backend probing: "Unable to initialize backend 'cuda'", TensorFlow).
QUIET_LOGGERS = ("absl", "jax._src.xla_bridge", "tensorflow", "orbax")
# Commands whose `--help` is answered from flan_jax.utils.gin_flags, without importing the trainer.
GIN_COMMANDS = ("train", "eval")

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
    "eval-harness": ("eval_harness", "main", "lm-evaluation-harness tasks (flan-jax eval-harness "
                                             "--gin_file=... --checkpoint=... --tasks arc_easy)"),
    "preference": ("preference", "main", "reward model / DPO after SFT "
                                         "(flan-jax preference --gin_file=gin_configs/runs/dpo_default_cpu.gin)"),
    "ppo": ("ppo", "main", "PPO after SFT (flan-jax ppo --gin_file=gin_configs/runs/ppo_rule_cpu.gin)"),
    "grpo": ("grpo", "main", "GRPO after SFT (flan-jax grpo --gin_file=gin_configs/runs/grpo_rule_cpu.gin)"),
    "self-instruct": ("self_instruct", "main", "generate instruction data "
                                               "(flan-jax self-instruct --gin_file=... --checkpoint=... --out=DIR)"),
}


def usage() -> str:
    lines = ["usage: flan-jax COMMAND [flags]   (flan-jax COMMAND --help for its flags)",
             "train, eval, data, compile, preference, ppo and grpo take --module NAME (repeatable): import your "
             "task-registration module first", "", "commands:"]
    lines += [f"    {name:<14}{help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def set_verbosity(argv: List[str]) -> List[str]:
    """Silences library noise unless --verbose is among argv; returns argv without it. Runs before heavy imports:
    the C++ loggers read their environment variables once, when the library loads."""
    if "--verbose" in argv:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")  # else the trainer's own quieting default applies
        logging.getLogger().setLevel(logging.INFO)
        return [a for a in argv if a != "--verbose"]
    for key, value in QUIET_ENVIRON.items():
        os.environ.setdefault(key, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return argv


# At import too: Python callers of flan_jax.cli.train (tests, notebooks) get the same quiet start.
set_verbosity(list(sys.argv))


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
    verbose = "--verbose" in rest
    rest = set_verbosity(rest)
    skip_absent_accelerators()
    if command in GIN_COMMANDS and ("-h" in rest or "--help" in rest):
        return gin_flags.print_help(command, rest)
    module, function, _ = COMMANDS[command]
    with quiet_native_stderr() if not verbose else contextlib.nullcontext():  # TF/XLA load here
        entry = getattr(importlib.import_module(f"flan_jax.cli.{module}"), function)
    return entry(rest)
