"""`flan-jax` command line: train | eval | data | convert."""
from __future__ import annotations

import os
import sys

# Quiet TensorFlow (input pipeline only) before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
from typing import Optional, Sequence

USAGE = """usage: flan-jax COMMAND [flags]
train, eval and data take --module NAME (repeatable): import your task-registration module first
    (flan-jax train --module mymodule --gin_file=... --gin.MIXTURE_OR_TASK_NAME=my_task_zs_opt)

commands:
    train     train from gin configs        (flan-jax train --gin_file=gin_configs/runs/default_cpu.gin)
    eval      evaluate a checkpoint          (flan-jax eval --gin_file=... --checkpoint=runs/default)
    data      list / show / stats of tasks   (flan-jax data list --collection default)
    convert   checkpoint conversion          (flan-jax convert --from t5x|hf --to hf|orbax IN OUT)
    self-instruct  generate instruction data (flan-jax self-instruct --gin_file=... --checkpoint=... --out=DIR)
    eval-suite  BBH / MMLU / TyDiQA / MGSM   (flan-jax eval-suite run --suite bbh --data_dir DIR --gin_file=...)
    preference  reward model / DPO after SFT (flan-jax preference --gin_file=gin_configs/runs/dpo_default_cpu.gin)
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    if argv is None:  # a real command line (not a call from Python): restart once with the tuned malloc
        from flan_jax.runtime_env import reexec_with_tuned_malloc
        reexec_with_tuned_malloc(["-m", "flan_jax.cli", *sys.argv[1:]])
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from flan_jax.train.main import main as train
        return train(rest)
    if command == "eval":
        from flan_jax.train.main import eval_cli
        return eval_cli(rest)
    if command == "data":
        from flan_jax.data_cli import main as data
        return data(rest)
    if command == "convert":
        from flan_jax.checkpoints.convert import main as convert
        return convert(rest)
    if command == "self-instruct":
        from flan_jax.generation.cli import main as self_instruct
        return self_instruct(rest)
    if command == "eval-suite":
        from flan_jax.suites_cli import main as eval_suite
        return eval_suite(rest)
    if command == "preference":
        from flan_jax.train.preference.main import main as preference
        return preference(rest)
    print(f"flan-jax: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
