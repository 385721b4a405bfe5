"""Gin edge of GRPO: `flan-jax grpo --gin_file=gin_configs/runs/grpo_rule_cpu.gin` (flags as `flan-jax ppo`).

The gin files hold the SFT run's `train.*` bindings (model, mixture, vocabulary): the policy and the frozen reference
are restored from `grpo_run.sft_checkpoint` with them (a PEFT run's config trains its 'peft' subtree only). Rewards:
`grpo_run.reward` 'rule' (exact match against each prompt's reference), 'learned' (a reward-model run,
`grpo_run.reward_model_dir`) or 'function' (`grpo_run.reward_function = @my_reward`, a gin-registered
fn(prompt_texts, response_texts, references) -> one float per response, from a --module), plus
`grpo_run.format_weight` times the format reward. Writes MODEL_DIR/metrics.jsonl (task grpo: train rows per
iteration, eval rows at iteration 0 = SFT and every eval_period), grpo_summary.json, policy_params/ and every
checkpoint_period iterations a resumable checkpoint (rerunning the same command continues from the latest).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Optional, Sequence

import gin
import jax
import numpy as np
from etils import epath

from flan_jax.cli import ppo as ppo_main, train as main_lib
from flan_jax.data.vocabularies import special_ids
from flan_jax.train.metrics_log import MetricsWriter
from flan_jax.train.preference import reward_adapter
from flan_jax.train.rl import grpo, prompts as prompts_lib, rollout as rollout_lib, rule_reward

REWARDS = ("rule", "learned", "function")


@gin.configurable("grpo")
def grpo_config(iterations: int = 40, prompts_per_iteration: int = 16, group_size: int = 8, epochs: int = 1,
                num_minibatches: int = 1, clip_eps: float = 0.2, kl_coef: float = 0.04, loss_type: str = "grpo",
                learning_rate: float = 1e-5, max_grad_norm: float = 1.0, pack: bool = True, pack_factor: int = 4,
                max_decode_len: int = 16, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                seed: int = 0) -> grpo.GRPOConfig:
    sampling = rollout_lib.SamplingConfig(max_decode_len, temperature, top_k, top_p)
    return grpo.GRPOConfig(iterations, prompts_per_iteration, group_size, epochs, num_minibatches, clip_eps, kl_coef,
                           loss_type, learning_rate, max_grad_norm, pack, pack_factor, sampling, seed)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model_dir: str
    sft_checkpoint: str
    prompt_task: str
    reward: str = "rule"
    reward_model_dir: Optional[str] = None
    reward_function: Optional[Callable] = None
    format_weight: float = 0.0
    num_train_prompts: int = 2000
    num_eval_prompts: int = 400
    prompt_length: int = 64
    eval_period: int = 20
    checkpoint_period: int = 10     # iterations; 0: no checkpoints (and no resume)
    keep_checkpoints: int = 2

    def __post_init__(self):
        if self.reward not in REWARDS:
            raise ValueError(f"grpo_run.reward={self.reward!r}: expected one of {REWARDS}")
        if self.reward == "learned" and not self.reward_model_dir:
            raise ValueError("grpo_run.reward='learned' needs grpo_run.reward_model_dir (a reward-model run's "
                             "MODEL_DIR)")
        if self.reward == "function" and not callable(self.reward_function):
            raise ValueError(f"grpo_run.reward='function' needs grpo_run.reward_function = @your_function (a "
                             f"gin-registered callable), got {self.reward_function!r}")
        if self.format_weight < 0:
            raise ValueError(f"grpo_run.format_weight={self.format_weight}: must be >= 0")
        for key in ("num_train_prompts", "num_eval_prompts", "prompt_length"):
            if getattr(self, key) <= 0:
                raise ValueError(f"grpo_run.{key}={getattr(self, key)}: must be positive")


@gin.configurable("grpo_run")
def run_config(model_dir: str = gin.REQUIRED, sft_checkpoint: str = gin.REQUIRED, prompt_task: str = gin.REQUIRED,
               reward: str = "rule", reward_model_dir: Optional[str] = None,
               reward_function: Optional[Callable] = None, format_weight: float = 0.0,
               num_train_prompts: int = 2000, num_eval_prompts: int = 400, prompt_length: int = 64,
               eval_period: int = 20, checkpoint_period: int = 10, keep_checkpoints: int = 2) -> RunConfig:
    return RunConfig(model_dir, sft_checkpoint, prompt_task, reward, reward_model_dir, reward_function,
                     format_weight, num_train_prompts, num_eval_prompts, prompt_length, eval_period,
                     checkpoint_period, keep_checkpoints)


def make_reward_fn(run: RunConfig, model_cfg, vocabulary):
    """The training reward: the chosen one, plus format_weight times the format reward."""
    if run.reward == "rule":
        main = rule_reward.exact_match_reward(vocabulary)
    elif run.reward == "learned":
        main = reward_adapter.learned_reward(run.reward_model_dir, model_cfg, special_ids(vocabulary).eos)
    else:
        main = grpo.text_reward(run.reward_function, vocabulary)
    if not run.format_weight:
        return main
    return grpo.weighted_sum([(1.0, main), (run.format_weight, grpo.format_reward(vocabulary))])


def _printer(writer: MetricsWriter):
    keys = ("reward_mean", "groups_with_signal", "kl", "greedy_reward_mean", "exact_match", "clip_fraction",
            "response_length", "rollout_tokens_per_sec", "seconds")

    def log(iteration, split, values):
        writer.write(iteration, split, "grpo", values)
        shown = "  ".join(f"{k} {values[k]:.4g}" for k in keys if k in values)
        print(f"grpo {split:5s} iter {iteration:3d}  {shown}", flush=True)
    return log


def _configs():
    try:
        return grpo_config(), run_config()
    except (ValueError, TypeError) as e:
        raise main_lib.ConfigError(str(e).strip().splitlines()[0]) from e


def run(argv: Sequence[str]) -> dict:
    _, train_cfg = main_lib.load_config(argv)
    cfg, run_cfg = _configs()
    start = time.time()
    os.makedirs(run_cfg.model_dir, exist_ok=True)
    epath.Path(run_cfg.model_dir, "config.gin").write_text(gin.config_str())
    sft_params, sft_step, vocab = main_lib.restore_trained(train_cfg, run_cfg.sft_checkpoint)
    cfg = ppo_main.with_vocabulary_eos(cfg, vocab)
    train_prompts, train_counts = prompts_lib.load_prompts(run_cfg.prompt_task, "train", run_cfg.num_train_prompts,
                                                           run_cfg.prompt_length)
    eval_prompts, eval_counts = prompts_lib.load_prompts(run_cfg.prompt_task, "validation",
                                                         run_cfg.num_eval_prompts, run_cfg.prompt_length)
    writer = MetricsWriter(run_cfg.model_dir, enable_tensorboard=False)
    print(f"grpo: SFT step {sft_step} from {run_cfg.sft_checkpoint}; {len(train_prompts.tokens)} train / "
          f"{len(eval_prompts.tokens)} held-out prompts of {run_cfg.prompt_task}; reward {run_cfg.reward}; "
          f"{cfg.prompts_per_iteration} prompts x {cfg.group_size} responses per iteration", flush=True)
    train_log, printer = [], _printer(writer)

    def log(iteration, split, values):
        printer(iteration, split, values)
        if split == "train":
            train_log.append(values)

    reward_fn = make_reward_fn(run_cfg, train_cfg.model, vocab)
    params, history = grpo.train(
        train_cfg.model, cfg, jax.device_get(sft_params), train_prompts, reward_fn,
        eval_prompts=eval_prompts, decode_text=lambda row: rule_reward.response_text(vocab, row), log=log,
        eval_period=run_cfg.eval_period, checkpoint=ppo_main.checkpoint_config(run_cfg))
    writer.close()
    summary = _summary(history, train_log, cfg, time.time() - start)
    summary["prompt_counts"] = {"train": train_counts, "validation": eval_counts}
    epath.Path(run_cfg.model_dir, "grpo_summary.json").write_text(json.dumps(summary, indent=1))
    ppo_main.save_params(run_cfg.model_dir, params)
    _print_result(summary)
    return summary


def _summary(history: dict, train_log: list, cfg: grpo.GRPOConfig, seconds: float) -> dict:
    """First and last held-out figures, and the median rollout throughput of the iterations after the first (the
    first one compiles)."""
    steady = [m for m in train_log if "rollout_tokens_per_sec" in m][1:]
    median = lambda key: float(np.median([m[key] for m in steady])) if steady else None
    return {"sft": history[0] if 0 in history else None, "grpo": history[max(history)] if history else None,
            "iterations": cfg.iterations, "loss_type": cfg.loss_type, "kl_coef": cfg.kl_coef, "seconds": seconds,
            "rollout_tokens_per_sec_median": median("rollout_tokens_per_sec"),
            "sample_tokens_per_sec_median": median("sample_tokens_per_sec")}


def _print_result(summary: dict) -> None:
    first, last = summary["sft"], summary["grpo"]
    if first and last:
        for key in ("reward_mean", "greedy_reward_mean", "exact_match", "kl"):
            if key in first:
                print(f"grpo held-out {key}: SFT {first[key]:.4f} -> GRPO {last[key]:.4f}")
        if "exact_match_stderr" in first:
            rise = last["exact_match"] - first["exact_match"]
            stderr = float(np.hypot(first["exact_match_stderr"], last["exact_match_stderr"]))
            print(f"grpo held-out exact_match change {rise:+.4f} (standard error of the difference {stderr:.4f}, "
                  f"{rise / max(stderr, 1e-9):+.1f} SE)")
    if summary["rollout_tokens_per_sec_median"] is not None:
        print(f"grpo rollout tokens/s (median, iterations 2+): {summary['rollout_tokens_per_sec_median']:.1f} "
              f"(sampling alone {summary['sample_tokens_per_sec_median']:.1f})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        run(sys.argv[1:] if argv is None else list(argv))
    except main_lib.ConfigError as e:
        print(f"grpo: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
