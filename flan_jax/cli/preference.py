"""Gin edge of preference training: `flan-jax preference --gin_file=gin_configs/runs/dpo_default_cpu.gin` (or
`python -m flan_jax.train.preference ...`). Flags as for `flan-jax train` (--gin_file, --gin.NAME=value, --module)."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import gin

from flan_jax.cli import train as sft_main

from flan_jax.train import optim, partitioning
from flan_jax.train.preference import loop
import os
from flan_jax.utils.user_modules import import_modules
from etils import epath


@gin.configurable("preference")
def preference_config(kind: str = gin.REQUIRED, model_dir: str = gin.REQUIRED, model=gin.REQUIRED,
                      init_checkpoint: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
                      task_feature_lengths: dict = gin.REQUIRED, train_steps: int = gin.REQUIRED,
                      pairs_per_batch: int = 32, train_prompts_per_task: int = 2000, eval_prompts_per_task: int = 200,
                      learning_rate: float = 1e-3, schedule: str = "constant", warmup_steps: int = 0,
                      multiply_by_parameter_scale: bool = False, beta: float = 0.1, loss_type: str = "sigmoid",
                      num_partitions: int = 1, fsdp: bool = False, eval_period: int = 0, checkpoint_period: int = 0,
                      keep_checkpoints: int = 2, log_period: int = 10, seed: int = 0) -> loop.PreferenceConfig:
    return loop.PreferenceConfig(
        kind=kind, model_dir=model_dir, model=model, init_checkpoint=init_checkpoint,
        mixture_or_task_name=mixture_or_task_name, task_feature_lengths=dict(task_feature_lengths),
        train_steps=train_steps, pairs_per_batch=pairs_per_batch, train_prompts_per_task=train_prompts_per_task,
        eval_prompts_per_task=eval_prompts_per_task,
        schedule=optim.ScheduleConfig(schedule, learning_rate, warmup_steps),
        adafactor=optim.AdafactorConfig(multiply_by_parameter_scale=multiply_by_parameter_scale),
        beta=beta, loss_type=loss_type, mesh=partitioning.MeshConfig(num_partitions, None, fsdp),
        eval_period=eval_period, checkpoint_period=checkpoint_period, keep_checkpoints=keep_checkpoints,
        log_period=log_period, seed=seed)


def configure(argv: Sequence[str]) -> loop.PreferenceConfig:
    """Flags -> task modules -> gin -> a validated PreferenceConfig, as `flan-jax train` does it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = sft_main.parse_flags(argv)
    import_modules(args.module)
    sft_main.configure_gin(args)
    sft_main.maybe_init_distributed()
    import tensorflow as tf  # lazy: TensorFlow takes seconds to import; only the input pipeline needs it
    tf.config.set_visible_devices([], "GPU")   # TensorFlow reads data only
    cfg = preference_config()
    loop.validate(cfg)
    return cfg


def check_init_checkpoint(cfg: loop.PreferenceConfig) -> None:
    loop.resolve_checkpoint(cfg.init_checkpoint)   # FileNotFoundError naming INIT_CHECKPOINT


def preference_main(argv: Sequence[str]) -> dict:
    try:
        cfg = configure(argv)
        check_init_checkpoint(cfg)
    except (ValueError, TypeError, KeyError, FileNotFoundError, OSError) as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), repr(e))
        raise sft_main.ConfigError(first) from e
    epath.Path(cfg.model_dir).mkdir(parents=True, exist_ok=True)
    epath.Path(cfg.model_dir, "config.gin").write_text(gin.config_str())
    summary = loop.run(cfg)
    before, after = summary["initial"]["mean"], summary["final"]["mean"]
    what = "reward model" if cfg.kind == "reward" else f"DPO ({cfg.loss_type}, beta {cfg.beta}) policy"
    print(f"{what}: held-out preference accuracy {before['preference_accuracy']:.3f} at step "
          f"{summary['start_step']} -> "
          f"{after['preference_accuracy']:.3f} at step {summary['step']}", flush=True)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        preference_main(argv)
    except sft_main.ConfigError as e:
        print(f"flan-jax preference: config error: {e}", file=sys.stderr)
        return 2
    return 0
