"""PPO against a reward with a KL penalty to the SFT policy and an optional pretraining (SFT mixture) term: InstructGPT
step 3 (Ouyang et al. 2022) with PPO's clipped objectives (Schulman et al. 2017) and Ziegler et al.'s KL control.

Per iteration: sample one response per prompt of a rollout batch from the policy, score it (reward_fn), shape the
per-token reward (score at the last token, -beta * KL(policy || SFT) at every token), compute GAE advantages, then run
`ppo_epochs` passes over shuffled minibatches of that batch. Each minibatch step minimises
    policy_loss + vf_coef * value_loss - entropy_coef * entropy + ptx_coef * SFT cross-entropy (a batch of the mixture).
The value head is linear on the policy's own final hidden states; by default they are read through stop_gradient, so
the value loss trains the head alone (value_gradient_to_policy=True lets it shape the shared backbone as well).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flan_jax import models
from flan_jax.train import loss as loss_lib, trainer as trainer_lib
from flan_jax.train.rl import ppo_math, ppo_resume, rollout as rollout_lib


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    iterations: int = 20
    rollout_batch_size: int = 64
    ppo_epochs: int = 4
    num_minibatches: int = 4
    clip_eps: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    ptx_coef: float = 0.0
    init_kl_coef: float = 0.1
    kl_target: Optional[float] = None    # None: fixed beta; else the adaptive controller's target (nats per response)
    kl_horizon: int = 10_000
    learning_rate: float = 1e-5
    value_learning_rate: Optional[float] = None   # the value head's Adam rate (None: learning_rate)
    max_grad_norm: float = 1.0
    whiten_advantages: bool = True
    normalize_reward: bool = True     # train on (score - mean) / std of the SFT policy's scores (InstructGPT-style)
    value_gradient_to_policy: bool = False   # True: the value loss also trains the shared backbone
    sampling: rollout_lib.SamplingConfig = rollout_lib.SamplingConfig()
    seed: int = 0

    def __post_init__(self):
        if self.rollout_batch_size % self.num_minibatches:
            raise ValueError(f"ppo.rollout_batch_size={self.rollout_batch_size} does not split into "
                             f"ppo.num_minibatches={self.num_minibatches}")
        for key in ("iterations", "ppo_epochs", "num_minibatches"):
            if getattr(self, key) <= 0:
                raise ValueError(f"ppo.{key}={getattr(self, key)}: must be positive")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"ppo.clip_eps={self.clip_eps}: expected in (0, 1)")

    def kl_controller(self) -> ppo_math.KLController:
        return ppo_math.KLController(self.init_kl_coef, self.kl_target, self.kl_horizon)


def make_optimizer(cfg: PPOConfig) -> optax.GradientTransformation:
    """Adam after global-norm clipping; the value head may run at its own rate (it starts from zero and must track
    returns within a few iterations, while the policy should move slowly)."""
    value_lr = cfg.learning_rate if cfg.value_learning_rate is None else cfg.value_learning_rate
    labels = lambda params: {'policy': jax.tree.map(lambda _: 'policy', params['policy']),
                             'value_head': jax.tree.map(lambda _: 'value', params['value_head'])}
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                       optax.multi_transform({'policy': optax.adam(cfg.learning_rate), 'value': optax.adam(value_lr)},
                                             labels))


def ptx_loss(model_cfg, policy_params, batch: dict) -> jax.Array:
    """The SFT objective on a batch of the mixture (token-mean cross-entropy, as the SFT run's default)."""
    logits = models.forward(model_cfg, policy_params, batch)
    total, denom, _ = loss_lib.summed_loss(logits, batch)
    return total / jnp.maximum(denom, 1e-9)


def ppo_loss(model_cfg, cfg: PPOConfig, params: dict, minibatch: dict, ptx_batch: Optional[dict]):
    """(total loss, metrics) on one minibatch of a rollout (Rollout.arrays() rows)."""
    mask = minibatch['mask']
    log_probs, entropy, values = rollout_lib.policy_outputs(model_cfg, params, minibatch['prompts'],
                                                            minibatch['responses'], cfg.value_gradient_to_policy)
    pg, clip_fraction = ppo_math.policy_loss(log_probs, minibatch['old_log_probs'], minibatch['advantages'], mask,
                                             cfg.clip_eps)
    vf, value_clip_fraction = ppo_math.value_loss(values, minibatch['old_values'], minibatch['returns'], mask,
                                                  cfg.value_clip)
    mean_entropy = ppo_math.masked_mean(entropy, mask)
    total = pg + cfg.vf_coef * vf - cfg.entropy_coef * mean_entropy
    metrics = {'policy_loss': pg, 'value_loss': vf, 'clip_fraction': clip_fraction,
               'value_clip_fraction': value_clip_fraction, 'entropy': mean_entropy,
               'approx_kl_old': ppo_math.masked_mean(minibatch['old_log_probs'] - log_probs, mask)}
    if ptx_batch is not None:
        ptx = ptx_loss(model_cfg, params['policy'], ptx_batch)
        total = total + cfg.ptx_coef * ptx
        metrics['ptx_loss'] = ptx
    return total, metrics


def make_update_step(model_cfg, cfg: PPOConfig, optimizer: optax.GradientTransformation) -> Callable:
    """step(state, minibatch, ptx_batch or None) -> (state, metrics); state = {'params', 'opt_state'}; jitted."""
    grad_fn = jax.value_and_grad(lambda p, mb, ptx: ppo_loss(model_cfg, cfg, p, mb, ptx), has_aux=True)

    def step(state, minibatch, ptx_batch):
        (loss, metrics), grads = grad_fn(state['params'], minibatch, ptx_batch)
        updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
        params = optax.apply_updates(state['params'], updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return {'params': params, 'opt_state': opt_state}, metrics

    return jax.jit(step)


def init_state(model_cfg, policy_params, optimizer, value_bias: float = 0.0) -> dict:
    params = {'policy': policy_params, 'value_head': rollout_lib.init_value_head(model_cfg, value_bias)}
    return {'params': params, 'opt_state': optimizer.init(params)}


def _minibatches(arrays: dict, num_minibatches: int, rng: np.random.Generator) -> Iterator[dict]:
    order = rng.permutation(next(iter(arrays.values())).shape[0])
    for rows in np.array_split(order, num_minibatches):
        yield {k: v[rows] for k, v in arrays.items() if v.ndim > 0}


def train_on_rollout(update_step, state: dict, rollout: rollout_lib.Rollout, cfg: PPOConfig,
                     rng: np.random.Generator, ptx_batches: Optional[Iterator[dict]] = None):
    """ppo_epochs passes over shuffled minibatches -> (state, metrics averaged over all minibatch steps)."""
    arrays = {k: v for k, v in rollout.arrays().items() if k not in ('kl', 'scores', 'reference_log_probs')}
    sums, steps = {}, 0
    for _ in range(cfg.ppo_epochs):
        for minibatch in _minibatches(arrays, cfg.num_minibatches, rng):
            ptx = None if ptx_batches is None or cfg.ptx_coef == 0 else next(ptx_batches)
            state, metrics = update_step(state, minibatch, ptx)
            sums = {k: sums.get(k, 0.0) + v for k, v in metrics.items()}
            steps += 1
    return state, {k: float(v) / steps for k, v in sums.items()}


def rollout_metrics(rollout: rollout_lib.Rollout) -> dict:
    mask = rollout.mask
    return {'reward_mean': float(jnp.mean(rollout.scores)),
            'kl': float(jnp.mean(jnp.sum(rollout.kl, axis=-1))),
            'response_length': float(jnp.mean(jnp.sum(mask, axis=-1))),
            'advantage_mean': float(ppo_math.masked_mean(rollout.advantages, mask))}


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Tokenized prompts [N, Lin] and, for checkable tasks, each prompt's reference answer ('' when unknown)."""
    tokens: np.ndarray
    references: tuple

    def __post_init__(self):
        if len(self.tokens) != len(self.references):
            raise ValueError(f"PromptSet: {len(self.tokens)} prompts but {len(self.references)} references")

    def rows(self, index: np.ndarray) -> tuple[np.ndarray, list]:
        return self.tokens[index], [self.references[i] for i in index]


def evaluate(model_cfg, params: dict, reference_params, prompts: PromptSet, reward_fn, cfg: PPOConfig,
             decode_text: Optional[Callable] = None, batch_size: int = 128, seed: int = 1234) -> dict:
    """Held-out figures: with sampled responses (the PPO objective's distribution) reward_mean and kl (mean sequence
    KL(policy || SFT) estimate); with greedy responses greedy_reward_mean and, given decode_text, exact_match of the
    decoded response against each prompt's reference (and its binomial standard error)."""
    sums = {'reward_mean': 0.0, 'kl': 0.0, 'greedy_reward_mean': 0.0, 'exact_match': 0.0}
    greedy = dataclasses.replace(cfg.sampling, temperature=0.0)
    n = len(prompts.tokens)
    for start in range(0, n, batch_size):
        index = np.arange(start, min(start + batch_size, n))
        tokens, refs = prompts.rows(index)
        tokens = jnp.asarray(tokens)
        sampled = rollout_lib.sample(model_cfg, params['policy'], tokens, jax.random.PRNGKey(seed + start),
                                     cfg.sampling)
        mask = ppo_math.response_mask(sampled, cfg.sampling.eos_id)
        log_probs = rollout_lib.reference_log_probs(model_cfg, params['policy'], tokens, sampled)
        ref = rollout_lib.reference_log_probs(model_cfg, reference_params, tokens, sampled)
        sums['kl'] += float(jnp.sum(ppo_math.sequence_kl(log_probs, ref, mask)))
        sums['reward_mean'] += float(np.sum(reward_fn(np.asarray(tokens), np.asarray(sampled), refs)))
        best = rollout_lib.sample(model_cfg, params['policy'], tokens, jax.random.PRNGKey(0), greedy)
        sums['greedy_reward_mean'] += float(np.sum(reward_fn(np.asarray(tokens), np.asarray(best), refs)))
        if decode_text is not None:
            texts = [decode_text(row) for row in np.asarray(best)]
            sums['exact_match'] += sum(t.strip() == r.strip() for t, r in zip(texts, refs))
    out = {k: v / n for k, v in sums.items()}
    if decode_text is None:
        out.pop('exact_match')
    else:   # binomial standard error of the held-out exact match, so a change can be judged against noise
        out['exact_match_stderr'] = float(np.sqrt(out['exact_match'] * (1 - out['exact_match']) / n))
    return out


def reward_statistics(model_cfg, policy_params, prompts: PromptSet, reward_fn, cfg: PPOConfig, rng) -> tuple:
    """(mean, std) of reward_fn over one rollout batch of the (SFT) policy's samples."""
    index = np.random.default_rng(cfg.seed + 1).choice(len(prompts.tokens), cfg.rollout_batch_size, replace=False)
    tokens, refs = prompts.rows(index)
    responses = rollout_lib.sample(model_cfg, policy_params, jnp.asarray(tokens), rng, cfg.sampling)
    scores = np.asarray(reward_fn(tokens, np.asarray(responses), refs), np.float64)
    return float(scores.mean()), float(max(scores.std(), 1e-6))


def normalized(reward_fn, mean: float, std: float):
    return lambda prompts, responses, refs: (np.asarray(reward_fn(prompts, responses, refs)) - mean) / std


def train(model_cfg, cfg: PPOConfig, sft_params, train_prompts: PromptSet, reward_fn, *,
          eval_prompts: Optional[PromptSet] = None, decode_text=None, ptx_batches=None,
          log: Callable[[int, str, dict], None] = lambda step, split, values: None, eval_period: int = 0,
          value_bias: float = 0.0, checkpoint: Optional[ppo_resume.CheckpointConfig] = None):
    """Runs cfg.iterations PPO iterations from the SFT params (also the frozen reference) -> (params, history).

    log(iteration, 'train' | 'eval', metrics) is called after every iteration and every evaluation (iteration 0 is the
    SFT policy). history holds the eval dicts by iteration. With `checkpoint`, the run saves every checkpoint.period
    iterations and first resumes from the directory's latest checkpoint, if any (ppo_resume.py). Evaluations and
    checkpoints fall where the SFT loop's would (trainer.Periods), and always after the last iteration.
    """
    optimizer = make_optimizer(cfg)
    update_step = make_update_step(model_cfg, cfg, optimizer)
    periods = trainer_lib.Periods(cfg.iterations, log=1, eval=eval_period,
                                  checkpoint=0 if checkpoint is None else checkpoint.period)
    key = jax.random.PRNGKey(cfg.seed)
    ckpt = ppo_resume.open_checkpointer(checkpoint)
    state, progress, resumed = _start(model_cfg, cfg, sft_params, optimizer, value_bias, ckpt, log)
    controller = dataclasses.replace(cfg.kl_controller(), beta=progress.beta)
    np_rng = np.random.default_rng(cfg.seed)
    np_rng.bit_generator.state = progress.np_rng_state
    history = progress.history
    ptx = None if ptx_batches is None else ppo_resume.CountingIterator(ptx_batches, progress.ptx_consumed)

    def run_eval(iteration):
        if eval_prompts is not None and iteration not in history:
            history[iteration] = evaluate(model_cfg, state['params'], sft_params, eval_prompts, reward_fn, cfg,
                                          decode_text)
            log(iteration, 'eval', history[iteration])

    if not resumed:
        run_eval(0)
        progress.reward_stats = _sft_reward_stats(model_cfg, cfg, sft_params, train_prompts, reward_fn, key, log)
    train_reward_fn = reward_fn if progress.reward_stats is None else normalized(reward_fn, *progress.reward_stats)
    try:
        for iteration in range(progress.iteration + 1, cfg.iterations + 1):
            started = time.time()
            index = np_rng.choice(len(train_prompts.tokens), cfg.rollout_batch_size, replace=False)
            prompts, refs = train_prompts.rows(index)
            batch = rollout_lib.collect(model_cfg, state['params'], sft_params, prompts, refs,
                                        jax.random.fold_in(key, iteration), train_reward_fn, controller.beta,
                                        cfg.sampling, cfg.gamma, cfg.lam, cfg.whiten_advantages)
            metrics = rollout_metrics(batch)   # reward_mean in the training (normalized) units
            state, update_metrics = train_on_rollout(update_step, state, batch, cfg, np_rng, ptx)
            metrics.update(update_metrics, beta=controller.beta, seconds=time.time() - started)
            controller = controller.update(metrics['kl'], cfg.rollout_batch_size)
            log(iteration, 'train', metrics)
            last = iteration == cfg.iterations
            if periods.eval_due(iteration) or last:
                run_eval(iteration)
            progress = dataclasses.replace(progress, iteration=iteration, beta=controller.beta,
                                           np_rng_state=np_rng.bit_generator.state,
                                           ptx_consumed=0 if ptx is None else ptx.consumed)
            if ckpt is not None and (periods.checkpoint_due(iteration) or last):
                ppo_resume.save(ckpt, state, progress)
    finally:
        if ckpt is not None:
            ckpt.close()
    return state['params'], history


def _start(model_cfg, cfg: PPOConfig, sft_params, optimizer, value_bias: float, ckpt, log) -> tuple:
    """(state, Progress, resumed): the checkpointer's latest, else a fresh start from the SFT policy."""
    state = init_state(model_cfg, sft_params, optimizer, value_bias)
    resumed = ppo_resume.restore_latest(ckpt, state)
    if resumed is None:
        rng_state = np.random.default_rng(cfg.seed).bit_generator.state
        return state, ppo_resume.Progress(0, cfg.kl_controller().beta, rng_state, None, {}), False
    state, progress = resumed
    log(progress.iteration, 'train', {'resumed_from': progress.iteration})
    return state, progress, True


def _sft_reward_stats(model_cfg, cfg: PPOConfig, sft_params, prompts: PromptSet, reward_fn, key, log):
    """[mean, std] of the SFT policy's scores (logged at iteration 0), or None without reward normalisation."""
    if not cfg.normalize_reward:
        return None
    stats = list(reward_statistics(model_cfg, sft_params, prompts, reward_fn, cfg, jax.random.fold_in(key, 10**6)))
    log(0, 'train', {'sft_reward_mean': stats[0], 'sft_reward_std': stats[1]})
    return stats
