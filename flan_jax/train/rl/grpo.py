"""GRPO (Shao et al. 2024) on PPO's pieces: no value model, G sampled responses per prompt, group-normalized advantages.

Per iteration: draw `prompts_per_iteration` prompts, sample `group_size` responses to each with the policy
(rollout.sample), score them (a RewardFn: exact match, format, a reward model, a user function), turn each group's
rewards into advantages (grpo_math.group_advantages), lay the (prompt, response) pairs out as the family trains on
them, several per row when `pack` (flan_jax.packing's best-fit packer and feature builders), score them under the
frozen reference when kl_coef > 0, then take `epochs` passes over `num_minibatches` minibatches minimising
grpo_math.objective. With one pass over one minibatch the policy that sampled is the one being updated: the ratio is
1 and no old log-probs are computed. PEFT models train their 'peft' subtree only; the base stays frozen.
Evaluation (ppo.evaluate) and checkpoints / exact resume (ppo_resume, trainer.Periods) are PPO's.
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flan_jax import models
from flan_jax import packing
from flan_jax.train import state as state_lib, trainer as trainer_lib
from flan_jax.train.rl import grpo_math, ppo, ppo_math, ppo_resume, rollout as rollout_lib, rule_reward


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    iterations: int = 40
    prompts_per_iteration: int = 16
    group_size: int = 8
    epochs: int = 1                 # passes over each rollout (the paper's mu)
    num_minibatches: int = 1
    clip_eps: float = 0.2
    kl_coef: float = 0.04           # beta of the k3 KL term; 0 drops the term and the reference forward pass
    loss_type: str = "grpo"         # 'dr_grpo': no 1/|o_i| and no std scaling of the advantages (Liu et al. 2025)
    learning_rate: float = 1e-5
    max_grad_norm: float = 1.0
    pack: bool = True               # several (prompt, response) pairs per row for the scoring and update passes
    pack_factor: int = 4            # a packed row is pack_factor times the unpacked widths
    sampling: rollout_lib.SamplingConfig = rollout_lib.SamplingConfig()
    seed: int = 0

    def __post_init__(self):
        for key in ("iterations", "prompts_per_iteration", "epochs", "num_minibatches", "pack_factor"):
            if getattr(self, key) <= 0:
                raise ValueError(f"grpo.{key}={getattr(self, key)}: must be positive")
        if self.group_size < 2:
            raise ValueError(f"grpo.group_size={self.group_size}: a group needs at least 2 responses to compare")
        if self.rollout_size % self.num_minibatches:
            raise ValueError(f"grpo.num_minibatches={self.num_minibatches} does not divide the "
                             f"{self.rollout_size} responses of an iteration (prompts_per_iteration * group_size)")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"grpo.clip_eps={self.clip_eps}: expected in (0, 1)")
        if self.kl_coef < 0:
            raise ValueError(f"grpo.kl_coef={self.kl_coef}: must be >= 0")
        if self.loss_type not in grpo_math.LOSS_TYPES:
            raise ValueError(f"grpo.loss_type={self.loss_type!r}: expected one of {grpo_math.LOSS_TYPES}")

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_iteration * self.group_size

    @property
    def on_policy(self) -> bool:
        """One update per rollout: the sampling policy is the updated one, so ratio = 1 (old log-probs unneeded)."""
        return self.epochs == 1 and self.num_minibatches == 1


# --- parameters: full tuning trains everything, PEFT its 'peft' subtree ------------------------------------------
def split_params(model_cfg, params: dict) -> tuple[dict, dict]:
    """(trainable, frozen): ({'peft': ...}, base) under PEFT, else (params, {})."""
    return state_lib.split_trainable(params) if state_lib.peft_enabled(model_cfg) else (params, {})


def join_params(trainable: dict, frozen: dict) -> dict:
    return {**frozen, **trainable}


# --- laying (prompt, response) pairs out in rows -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Packed:
    """A minibatch's pairs in the family's packed features [R, ...]; sequence i's response starts at column starts[i]
    of row rows[i] of decoder_target_tokens."""
    features: dict
    rows: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    def scatter(self, values: np.ndarray) -> np.ndarray:
        """Per-token values [B, Lt] of the responses -> [R, L] at their packed positions (0 elsewhere)."""
        out = np.zeros(self.features["decoder_target_tokens"].shape, np.float32)
        seq = np.repeat(np.arange(len(self.rows)), self.lengths)
        offset = np.arange(len(seq)) - np.repeat(np.cumsum(self.lengths) - self.lengths, self.lengths)
        out[self.rows[seq], self.starts[seq] + offset] = np.asarray(values)[seq, offset]
        return out


def _prompt_slots(model_cfg) -> int:
    """Prompt tuning's placeholder count, which leads every prompt (as flan_jax.packing puts it); else 0."""
    peft = getattr(model_cfg, "peft", None)
    return peft.prompt_length if peft is not None and peft.method == "prompt" else 0


def _segments(model_cfg, prompts: np.ndarray, responses: np.ndarray, lengths: np.ndarray) -> list:
    """(prompt, response) token arrays without padding, prompt-tuning slots first."""
    slots = np.full(_prompt_slots(model_cfg), packing.PROMPT_SLOT_ID, np.int32)
    prompt_lengths = np.sum(prompts != 0, axis=1)
    return [(np.concatenate([slots, p[:n]]).astype(np.int32), r[:m].astype(np.int32))
            for p, n, r, m in zip(prompts, prompt_lengths, responses, lengths)]


def _row_order(segments: list, capacities: tuple, one_per_row: bool) -> list:
    """Rows as lists of sequence indices (best-fit over the whole minibatch)."""
    if one_per_row:
        return [[i] for i in range(len(segments))]
    packer = packing.BestFitPacker(capacities, buffer_size=len(segments), seed=0)
    rows = [row for i, (p, r) in enumerate(segments)
            for row in packer.push(i, (len(p) + len(r),) if len(capacities) == 1 else (len(p), len(r)))]
    return rows + list(packer.flush())


def pack_pairs(model_cfg, prompts: np.ndarray, responses: np.ndarray, mask: np.ndarray, pack: bool,
               pack_factor: int = 4, row_multiple: int = 8) -> Packed:
    """Packed features of B (prompt [Lin], response [Lt]) pairs; mask [B, Lt] marks each response's real tokens.
    Unpacked (pack=False): one pair per row, B rows of the unpacked widths. Packed: rows pack_factor times as wide,
    their count rounded up to a multiple of row_multiple (few distinct shapes to compile)."""
    lengths = np.sum(np.asarray(mask) > 0, axis=1).astype(np.int64)
    segments = _segments(model_cfg, np.asarray(prompts), np.asarray(responses), lengths)
    factor = pack_factor if pack else 1
    width_in = prompts.shape[1] + _prompt_slots(model_cfg)
    encdec = models.is_encoder_decoder(model_cfg)
    capacities = (factor * width_in, factor * responses.shape[1]) if encdec else \
        (factor * (width_in + responses.shape[1]),)
    order = _row_order(segments, capacities, one_per_row=not pack)
    rows_of = [[segments[i] for i in row] for row in order]
    features = (packing.encdec_feature_batch(rows_of, capacities) if encdec
                else packing.prefix_lm_feature_batch(rows_of, capacities[0]))
    if pack:
        extra = -len(order) % row_multiple
        features = {k: np.pad(v, ((0, extra), (0, 0))) for k, v in features.items()}
    rows, starts = np.zeros(len(segments), np.int64), np.zeros(len(segments), np.int64)
    for r, row in enumerate(order):
        used = 0
        for i in row:
            p, t = segments[i]
            rows[i], starts[i] = r, used + (0 if encdec else len(p))
            used += len(t) if encdec else len(p) + len(t)
    return Packed(features, rows, starts, lengths)


def packed_log_probs(config, params, features: dict) -> jax.Array:
    """log p of every decoder target token of packed features, [R, L] (padding positions are meaningless)."""
    return ppo_math.token_log_probs(models.forward(config, params, features), features["decoder_target_tokens"])


_packed_log_probs = jax.jit(packed_log_probs, static_argnames=("config",))


# --- rollouts ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Groups:
    """One iteration's responses, each prompt's group_size rows contiguous; numpy arrays."""
    prompts: np.ndarray       # [P * G, Lin]
    responses: np.ndarray     # [P * G, Lt]
    mask: np.ndarray          # [P * G, Lt] real response tokens (through EOS)
    scores: np.ndarray        # [P * G]
    advantages: np.ndarray    # [P * G]


def sample_groups(model_cfg, policy_params, prompts: np.ndarray, references: list, rng, reward_fn,
                  cfg: GRPOConfig) -> tuple[Groups, float]:
    """(Groups, seconds spent sampling) for prompts [P, Lin] and their references."""
    repeated = np.repeat(np.asarray(prompts), cfg.group_size, axis=0)
    refs = [r for r in references for _ in range(cfg.group_size)]
    started = time.time()
    responses = np.asarray(rollout_lib.sample(model_cfg, policy_params, jnp.asarray(repeated), rng, cfg.sampling))
    seconds = time.time() - started
    mask = np.asarray(ppo_math.response_mask(responses, cfg.sampling.eos_id))
    scores = np.asarray(reward_fn(repeated, responses, refs), np.float32)
    advantages = np.asarray(grpo_math.group_advantages(scores, cfg.group_size, cfg.loss_type == "grpo"))
    return Groups(repeated, responses, mask, scores, advantages), seconds


def minibatch(model_cfg, cfg: GRPOConfig, groups: Groups, index: np.ndarray, policy_params, reference_params) -> dict:
    """The update's inputs for the responses `index`: packed features, per-token advantages, loss weights and
    response weights (1/b per token: sums to the mean over responses), old and reference log-probs where needed."""
    mask = groups.mask[index]
    packed = pack_pairs(model_cfg, groups.prompts[index], groups.responses[index], mask, cfg.pack, cfg.pack_factor)
    weights = np.asarray(grpo_math.token_weights(mask, cfg.loss_type, cfg.sampling.max_decode_len))
    batch = {"features": packed.features, "weights": packed.scatter(weights),
             "advantages": packed.scatter(groups.advantages[index][:, None] * mask),
             "response_weights": packed.scatter(mask / len(index))}
    if not cfg.on_policy:
        batch["old_log_probs"] = _packed_log_probs(model_cfg, policy_params, packed.features)
    if cfg.kl_coef:
        batch["reference_log_probs"] = _packed_log_probs(model_cfg, reference_params, packed.features)
    return batch


# --- the update ----------------------------------------------------------------------------------------------------
def make_optimizer(cfg: GRPOConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.learning_rate))


def grpo_loss(model_cfg, cfg: GRPOConfig, trainable: dict, frozen: dict, batch: dict):
    """(loss, metrics) of one minibatch (from `minibatch`)."""
    log_probs = packed_log_probs(model_cfg, join_params(trainable, frozen), batch["features"])
    old = batch["old_log_probs"] if "old_log_probs" in batch else jax.lax.stop_gradient(log_probs)
    reference = batch.get("reference_log_probs", old)
    loss, metrics = grpo_math.objective(log_probs, old, reference, batch["advantages"], batch["weights"],
                                        cfg.clip_eps, cfg.kl_coef)
    if cfg.kl_coef:   # per response, summed over its tokens: k1 as PPO reports it, and k3
        metrics["kl"] = jnp.sum(batch["response_weights"] * (log_probs - reference))
        metrics["kl_k3_per_response"] = jnp.sum(batch["response_weights"] * grpo_math.k3_kl(log_probs, reference))
    return loss, metrics


def make_update_step(model_cfg, cfg: GRPOConfig, optimizer: optax.GradientTransformation) -> Callable:
    """step(state, frozen, batch) -> (state, metrics); state = {'params': trainable, 'opt_state'}; jitted."""
    grad_fn = jax.value_and_grad(lambda p, f, b: grpo_loss(model_cfg, cfg, p, f, b), has_aux=True)

    def step(state, frozen, batch):
        (loss, metrics), grads = grad_fn(state["params"], frozen, batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state}, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))

    return jax.jit(step)


# --- rewards beside exact match (rule_reward.py) and the reward model (preference/reward_adapter.py) -------------
def _skeleton(text: str) -> str:
    return re.sub(r"\d+", "0", text.strip())


def format_reward(vocabulary) -> Callable:
    """RewardFn: 1.0 when the response has the reference's shape (the same text once every number is 0), else 0."""
    def reward(prompts, responses, references):
        del prompts
        texts = [rule_reward.response_text(vocabulary, row) for row in responses]
        return np.array([float(_skeleton(t) == _skeleton(r)) for t, r in zip(texts, references)], np.float32)
    return reward


def text_reward(fn: Callable, vocabulary) -> Callable:
    """RewardFn from a user function fn(prompt_texts, response_texts, references) -> one float per response."""
    def reward(prompts, responses, references):
        decode = lambda rows: [rule_reward.response_text(vocabulary, row) for row in rows]
        scores = np.asarray(fn(decode(prompts), decode(responses), list(references)), np.float32)
        if scores.shape != (len(responses),):
            raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} returned shape {scores.shape}, "
                             f"expected ({len(responses)},)")
        return scores
    return reward


def weighted_sum(parts: list) -> Callable:
    """RewardFn: sum of weight * reward_fn over parts [(weight, reward_fn)]."""
    return lambda prompts, responses, refs: sum(w * np.asarray(fn(prompts, responses, refs), np.float32)
                                                for w, fn in parts)


# --- the loop ------------------------------------------------------------------------------------------------------
def _update(update_step, state, frozen, batches: list, cfg: GRPOConfig, np_rng) -> tuple:
    sums, steps = {}, 0
    for _ in range(cfg.epochs):
        for i in np_rng.permutation(len(batches)):
            state, metrics = update_step(state, frozen, batches[i])
            sums = {k: sums.get(k, 0.0) + v for k, v in metrics.items()}
            steps += 1
    return state, {k: float(v) / steps for k, v in sums.items()}


def iterate(model_cfg, cfg: GRPOConfig, update_step, state: dict, frozen: dict, reference_params,
            prompts: ppo.PromptSet, reward_fn, rng, np_rng) -> tuple[dict, dict]:
    """One GRPO iteration -> (state, metrics). The rollout phase (sampling, rewards, layout, old and reference
    log-probs) is timed apart from the update: rollout_tokens_per_sec counts real response tokens."""
    started = time.time()
    tokens, refs = prompts.rows(np_rng.choice(len(prompts.tokens), cfg.prompts_per_iteration, replace=False))
    policy = join_params(state["params"], frozen)
    groups, sample_seconds = sample_groups(model_cfg, policy, tokens, refs, rng, reward_fn, cfg)
    order = np_rng.permutation(cfg.rollout_size)
    batches = [minibatch(model_cfg, cfg, groups, index, policy, reference_params)
               for index in np.array_split(order, cfg.num_minibatches)]
    jax.block_until_ready(batches)
    rollout_seconds = time.time() - started
    state, metrics = _update(update_step, state, frozen, batches, cfg, np_rng)
    generated = float(groups.mask.sum())
    std = groups.scores.reshape(-1, cfg.group_size).std(axis=1)
    metrics.update(reward_mean=float(groups.scores.mean()), groups_with_signal=float(np.mean(std > 0)),
                   response_length=generated / cfg.rollout_size, sample_tokens_per_sec=generated / sample_seconds,
                   rollout_tokens_per_sec=generated / rollout_seconds, rollout_seconds=rollout_seconds,
                   packed_rows=float(sum(len(b["weights"]) for b in batches)), seconds=time.time() - started)
    return state, metrics


def train(model_cfg, cfg: GRPOConfig, sft_params, train_prompts: ppo.PromptSet, reward_fn, *,
          eval_prompts: Optional[ppo.PromptSet] = None, decode_text=None,
          log: Callable[[int, str, dict], None] = lambda step, split, values: None, eval_period: int = 0,
          checkpoint: Optional[ppo_resume.CheckpointConfig] = None):
    """cfg.iterations GRPO iterations from the SFT params (also the frozen reference) -> (params, history), as
    ppo.train: log(iteration, 'train' | 'eval', metrics), history {iteration: held-out figures} (0 = SFT), evals and
    checkpoints where trainer.Periods puts them, resume from the checkpoint directory's latest checkpoint."""
    trainable, frozen = split_params(model_cfg, sft_params)
    optimizer = make_optimizer(cfg)
    update_step = make_update_step(model_cfg, cfg, optimizer)
    periods = trainer_lib.Periods(cfg.iterations, log=1, eval=eval_period,
                                  checkpoint=0 if checkpoint is None else checkpoint.period)
    key = jax.random.PRNGKey(cfg.seed)
    ckpt = ppo_resume.open_checkpointer(checkpoint)
    state, progress = _start(cfg, trainable, optimizer, ckpt, log)
    np_rng = np.random.default_rng(cfg.seed)
    np_rng.bit_generator.state = progress.np_rng_state
    history = progress.history

    def run_eval(iteration):
        if eval_prompts is not None and iteration not in history:
            params = {"policy": join_params(state["params"], frozen)}
            history[iteration] = ppo.evaluate(model_cfg, params, sft_params, eval_prompts, reward_fn, cfg, decode_text)
            log(iteration, "eval", history[iteration])

    if progress.iteration == 0:
        run_eval(0)
    try:
        for iteration in range(progress.iteration + 1, cfg.iterations + 1):
            state, metrics = iterate(model_cfg, cfg, update_step, state, frozen, sft_params, train_prompts,
                                     reward_fn, jax.random.fold_in(key, iteration), np_rng)
            log(iteration, "train", metrics)
            last = iteration == cfg.iterations
            if periods.eval_due(iteration) or last:
                run_eval(iteration)
            progress = dataclasses.replace(progress, iteration=iteration, np_rng_state=np_rng.bit_generator.state)
            if ckpt is not None and (periods.checkpoint_due(iteration) or last):
                ppo_resume.save(ckpt, state, progress)
    finally:
        if ckpt is not None:
            ckpt.close()
    return join_params(state["params"], frozen), history


def _start(cfg: GRPOConfig, trainable: dict, optimizer, ckpt, log) -> tuple:
    """(state, ppo_resume.Progress): the checkpointer's latest, else a fresh start (beta holds kl_coef)."""
    state = {"params": trainable, "opt_state": optimizer.init(trainable)}
    resumed = ppo_resume.restore_latest(ckpt, state)
    if resumed is None:
        rng_state = np.random.default_rng(cfg.seed).bit_generator.state
        return state, ppo_resume.Progress(0, cfg.kl_coef, rng_state, None, {})
    log(resumed[1].iteration, "train", {"resumed_from": resumed[1].iteration})
    return resumed
