"""Gin edge of PPO: `python -m flan_jax.cli.ppo --gin_file=gin_configs/runs/ppo_default_cpu.gin`.

The gin files also hold the SFT run's `train.*` bindings (model, mixture, vocabulary): the policy and the frozen
reference are restored from `ppo_run.sft_checkpoint` with them, and the ptx term reads batches of that mixture.
Writes MODEL_DIR/metrics.jsonl (split train: one row per iteration; split eval: held-out figures at iteration 0, the
SFT policy, and every eval_period), MODEL_DIR/ppo_summary.json, a params checkpoint of the final policy
(policy_params/) and every ppo_run.checkpoint_period iterations a resumable checkpoint (MODEL_DIR/checkpoint_<i>/,
ppo_resume.py): rerunning the same command into the same MODEL_DIR continues from the latest one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

import gin
import jax
import numpy as np
from etils import epath

from flan_jax.pipeline import batches as data_lib
from flan_jax.data.vocabularies import special_ids

from flan_jax.cli import train as main_lib
from flan_jax.train.metrics_log import MetricsWriter
from flan_jax.train.rl import ppo, ppo_resume, prompts as prompts_lib, rollout as rollout_lib, rule_reward
from flan_jax.train.preference import reward_adapter
from flan_jax import models
import orbax.checkpoint as ocp

REWARDS = ("learned", "rule")


@gin.configurable("ppo")
def ppo_config(iterations: int = 20, rollout_batch_size: int = 64, ppo_epochs: int = 4, num_minibatches: int = 4,
               clip_eps: float = 0.2, value_clip: float = 0.2, gamma: float = 1.0, lam: float = 0.95,
               vf_coef: float = 0.1, entropy_coef: float = 0.0, ptx_coef: float = 0.0, init_kl_coef: float = 0.1,
               kl_target: Optional[float] = None, kl_horizon: int = 10_000, learning_rate: float = 1e-5,
               value_learning_rate: Optional[float] = None,
               max_grad_norm: float = 1.0, whiten_advantages: bool = True, normalize_reward: bool = True,
               value_gradient_to_policy: bool = False, max_decode_len: int = 16,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> ppo.PPOConfig:
    sampling = rollout_lib.SamplingConfig(max_decode_len, temperature, top_k, top_p)
    return ppo.PPOConfig(iterations, rollout_batch_size, ppo_epochs, num_minibatches, clip_eps, value_clip, gamma,
                         lam, vf_coef, entropy_coef, ptx_coef, init_kl_coef, kl_target, kl_horizon, learning_rate,
                         value_learning_rate, max_grad_norm, whiten_advantages, normalize_reward,
                         value_gradient_to_policy, sampling, seed)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model_dir: str
    sft_checkpoint: str
    prompt_task: str
    reward: str = "learned"
    reward_model_dir: Optional[str] = None
    num_train_prompts: int = 2000
    num_eval_prompts: int = 200
    prompt_length: int = 64
    eval_period: int = 5
    ptx_batch_size: int = 4
    checkpoint_period: int = 10     # iterations; 0: no checkpoints (and no resume)
    keep_checkpoints: int = 2

    def __post_init__(self):
        if self.reward not in REWARDS:
            raise ValueError(f"ppo_run.reward={self.reward!r}: expected one of {REWARDS}")
        if self.reward == "learned" and not self.reward_model_dir:
            raise ValueError("ppo_run.reward='learned' needs ppo_run.reward_model_dir (a reward-model run's "
                             "MODEL_DIR); ppo_run.reward='rule' uses the checkable exact-match reward instead")


@gin.configurable("ppo_run")
def run_config(model_dir: str = gin.REQUIRED, sft_checkpoint: str = gin.REQUIRED, prompt_task: str = gin.REQUIRED,
               reward: str = "learned", reward_model_dir: Optional[str] = None, num_train_prompts: int = 2000,
               num_eval_prompts: int = 200, prompt_length: int = 64, eval_period: int = 5,
               ptx_batch_size: int = 4, checkpoint_period: int = 10, keep_checkpoints: int = 2) -> RunConfig:
    return RunConfig(model_dir, sft_checkpoint, prompt_task, reward, reward_model_dir, num_train_prompts,
                     num_eval_prompts, prompt_length, eval_period, ptx_batch_size, checkpoint_period,
                     keep_checkpoints)


def checkpoint_config(run: RunConfig) -> Optional[ppo_resume.CheckpointConfig]:
    """MODEL_DIR/checkpoint_<iteration>/ as the SFT trainer writes them; a rerun into MODEL_DIR resumes."""
    if run.checkpoint_period == 0:
        return None
    return ppo_resume.CheckpointConfig(run.model_dir, run.checkpoint_period, run.keep_checkpoints)


def make_reward_fn(run: RunConfig, model_cfg, vocabulary):
    if run.reward == "rule":
        return rule_reward.exact_match_reward(vocabulary)
    return reward_adapter.learned_reward(run.reward_model_dir, model_cfg, special_ids(vocabulary).eos)


def with_vocabulary_eos(cfg: ppo.PPOConfig, vocabulary) -> ppo.PPOConfig:
    """Rollouts stop at the vocabulary's EOS: the one the rewards read responses up to."""
    return dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, eos_id=special_ids(vocabulary).eos))


def ptx_batches(train_cfg, run: RunConfig):
    """Batches of the SFT mixture (the SFT run's packing), ptx_batch_size rows each."""
    input_cfg = dataclasses.replace(train_cfg.input, global_batch_size=run.ptx_batch_size)
    converter = models.feature_converter(train_cfg.model, seed=train_cfg.seed)
    return (dict(b) for b in data_lib.train_batches(input_cfg, converter))


def _printer(writer: MetricsWriter):
    keys = ("sft_reward_mean", "sft_reward_std", "reward_mean", "kl", "greedy_reward_mean", "exact_match", "entropy",
            "clip_fraction", "value_loss", "beta", "ptx_loss", "seconds")

    def log(iteration, split, values):
        writer.write(iteration, split, "ppo", values)
        shown = "  ".join(f"{k} {values[k]:.4g}" for k in keys if k in values)
        print(f"ppo {split:5s} iter {iteration:3d}  {shown}", flush=True)
    return log


def run(argv: Sequence[str]) -> dict:
    args, train_cfg = main_lib.load_config(argv)
    try:
        cfg, run_cfg = ppo_config(), run_config()
    except (ValueError, TypeError) as e:
        raise main_lib.ConfigError(str(e).strip().splitlines()[0]) from e
    start = time.time()
    os.makedirs(run_cfg.model_dir, exist_ok=True)
    epath.Path(run_cfg.model_dir, "config.gin").write_text(gin.config_str())
    sft_params, sft_step, vocab = main_lib.restore_trained(train_cfg, run_cfg.sft_checkpoint)
    sft_params = jax.device_get(sft_params)
    cfg = with_vocabulary_eos(cfg, vocab)
    train_prompts, train_counts = prompts_lib.load_prompts(run_cfg.prompt_task, "train", run_cfg.num_train_prompts,
                                                           run_cfg.prompt_length)
    eval_prompts, eval_counts = prompts_lib.load_prompts(run_cfg.prompt_task, "validation",
                                                         run_cfg.num_eval_prompts, run_cfg.prompt_length)
    reward_fn = make_reward_fn(run_cfg, train_cfg.model, vocab)
    writer = MetricsWriter(run_cfg.model_dir, enable_tensorboard=False)
    print(f"ppo: SFT step {sft_step} from {run_cfg.sft_checkpoint}; {len(train_prompts.tokens)} train / "
          f"{len(eval_prompts.tokens)} held-out prompts of {run_cfg.prompt_task}; reward {run_cfg.reward}", flush=True)
    params, history = ppo.train(
        train_cfg.model, cfg, sft_params, train_prompts, reward_fn, eval_prompts=eval_prompts,
        decode_text=lambda row: rule_reward.response_text(vocab, row),
        ptx_batches=ptx_batches(train_cfg, run_cfg) if cfg.ptx_coef > 0 else None, log=_printer(writer),
        eval_period=run_cfg.eval_period, checkpoint=checkpoint_config(run_cfg))
    writer.close()
    first, last = history[0], history[max(history)]
    summary = {"sft": first, "ppo": last, "iterations": cfg.iterations, "kl_target": cfg.kl_target,
               "seconds": time.time() - start, "prompt_counts": {"train": train_counts, "validation": eval_counts}}
    epath.Path(run_cfg.model_dir, "ppo_summary.json").write_text(json.dumps(summary, indent=1))
    save_params(run_cfg.model_dir, params)
    _print_acceptance(first, last, cfg.kl_target)
    return summary


def save_params(model_dir: str, params) -> None:
    path = os.path.abspath(os.path.join(model_dir, "policy_params"))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, jax.device_get(params), force=True)
    checkpointer.wait_until_finished()   # the save is asynchronous; the process may exit right after


def _print_acceptance(first: dict, last: dict, kl_target: Optional[float]) -> None:
    for key in ("reward_mean", "greedy_reward_mean", "exact_match", "kl"):
        if key in first:
            print(f"ppo held-out {key}: SFT {first[key]:.4f} -> PPO {last[key]:.4f}")
    if "exact_match_stderr" in first:
        rise = last["exact_match"] - first["exact_match"]
        stderr = float(np.hypot(first["exact_match_stderr"], last["exact_match_stderr"]))
        print(f"ppo held-out exact_match change {rise:+.4f} (standard error of the difference {stderr:.4f}, "
              f"{rise / max(stderr, 1e-9):+.1f} SE)")
    if kl_target is not None:
        print(f"ppo held-out KL {last['kl']:.4f} vs target {kl_target}: "
              f"{'within' if last['kl'] <= kl_target else 'ABOVE'} target")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        run(sys.argv[1:] if argv is None else list(argv))
    except main_lib.ConfigError as e:
        print(f"ppo: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
