"""Reward-model and DPO training: start from an SFT checkpoint, train on a preference pool, evaluate held-out
preference accuracy, checkpoint and resume as the SFT loop does (orbax, keep the latest N, exact resume)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from flan_jax import models

from flan_jax.data import preference as preference_data
from flan_jax.train import checkpointing, loop as sft_loop, optim, partitioning
from flan_jax.train.metrics_log import MetricsWriter, ProgressPrinter
from flan_jax.train.preference import losses, pairs, reward, steps

KINDS = ("reward", "dpo")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    kind: str                               # "reward" or "dpo"
    model_dir: str
    model: Any                              # T5Config or DecoderConfig (as the SFT run's)
    init_checkpoint: str                    # the SFT MODEL_DIR (its latest checkpoint) or a checkpoint_<step> dir
    mixture_or_task_name: str
    task_feature_lengths: dict              # {"inputs": Lin, "targets": Lt}
    train_steps: int
    pairs_per_batch: int = 32
    train_prompts_per_task: int = 2000
    eval_prompts_per_task: int = 200
    schedule: optim.ScheduleConfig = optim.ScheduleConfig(learning_rate=1e-3)
    adafactor: optim.AdafactorConfig = optim.AdafactorConfig(multiply_by_parameter_scale=False)
    beta: float = 0.1                       # DPO beta (IPO tau)
    loss_type: str = "sigmoid"              # DPO: "sigmoid" or "ipo"
    mesh: partitioning.MeshConfig = partitioning.MeshConfig()
    eval_period: int = 0
    checkpoint_period: int = 0
    keep_checkpoints: int = 2
    log_period: int = 10
    seed: int = 0


def validate(cfg: PreferenceConfig) -> None:
    checks = [(cfg.kind in KINDS, f"kind={cfg.kind!r}: expected one of {KINDS}"),
              (cfg.loss_type in losses.LOSS_TYPES, f"LOSS_TYPE={cfg.loss_type!r}: expected one of {losses.LOSS_TYPES}"),
              (cfg.beta > 0, f"BETA={cfg.beta}: must be > 0"),
              (cfg.train_steps > 0, f"TRAIN_STEPS={cfg.train_steps}: must be > 0"),
              (cfg.pairs_per_batch > 0, f"PAIRS_PER_BATCH={cfg.pairs_per_batch}: must be > 0"),
              (set(cfg.task_feature_lengths) >= {"inputs", "targets"},
               f"TASK_FEATURE_LENGTHS={cfg.task_feature_lengths}: needs 'inputs' and 'targets'")]
    for ok, problem in checks:
        if not ok:
            raise ValueError(problem)


# --- the SFT starting point -----------------------------------------------------------------------------------------
def resolve_checkpoint(path: str) -> tuple[str, int]:
    """(manager dir, step) of a checkpoint_<step> dir or of a MODEL_DIR's latest checkpoint."""
    path = os.path.abspath(path.rstrip("/"))
    match = re.fullmatch(rf"{checkpointing.STEP_PREFIX}_(\d+)", os.path.basename(path))
    if match:
        return os.path.dirname(path), int(match.group(1))
    step = checkpointing.Checkpointer(path, async_save=False).latest_step() if os.path.isdir(path) else None
    if step is None:
        raise FileNotFoundError(f"INIT_CHECKPOINT={path}: no checkpoint_<step> there (run the SFT job first: "
                                "bash scripts/train_default.sh)")
    return path, step


def load_sft_params(model_cfg, path: str, mesh_cfg, mesh) -> dict:
    """The params of an SFT train-state checkpoint (written by flan_jax.train.loop with default Adafactor)."""
    directory, step = resolve_checkpoint(path)
    sft_optimizer = optim.make_adafactor(optim.AdafactorConfig(), optim.make_schedule(optim.ScheduleConfig()))
    abstract, _ = sft_loop.abstract_train_state(model_cfg, sft_optimizer, mesh_cfg, mesh)
    try:
        state, _ = checkpointing.Checkpointer(directory, async_save=False).restore(abstract, step=step)
    except Exception as e:  # orbax raises several types for a tree that does not fit
        raise ValueError(f"INIT_CHECKPOINT={path}: checkpoint_{step} does not fit the gin model config "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    return state["params"]


def check_vocabulary(cfg: PreferenceConfig, tasks) -> None:
    """The preference tasks must tokenize as the SFT run did (its MODEL_DIR keeps vocabulary.model)."""
    saved = epath.Path(resolve_checkpoint(cfg.init_checkpoint)[0]) / "vocabulary.model"
    vocab = preference_data.preference_spec(tasks[0]).vocabulary
    if saved.exists() and hasattr(vocab, "sp_model") and vocab.sp_model != saved.read_bytes():
        raise ValueError(f"INIT_CHECKPOINT={cfg.init_checkpoint}: its vocabulary.model differs from the vocabulary "
                         f"of task {tasks[0]!r}; the policy would read other token ids")


# --- state --------------------------------------------------------------------------------------------------------
def state_shardings(params, axes, optimizer, mesh_cfg, mesh):
    shapes = jax.eval_shape(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": optimizer.init(p)},
                            params)
    rules = partitioning.logical_rules(mesh_cfg)
    shardings = {"step": partitioning.replicated(mesh),
                 "params": partitioning.param_shardings(shapes["params"], axes, rules, mesh),
                 "opt_state": partitioning.opt_state_shardings(shapes["opt_state"], shapes["params"], axes, rules,
                                                               mesh)}
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract, shardings


def initial_params(cfg: PreferenceConfig, sft_params):
    if cfg.kind == "reward":
        return reward.reward_params(cfg.model, sft_params), reward.reward_logical_axes(cfg.model)
    return sft_params, models.param_logical_axes(cfg.model)


def load_trained(cfg: PreferenceConfig, checkpoint: Optional[str] = None) -> tuple[dict, int]:
    """(params, step) of a preference run's checkpoint (default: MODEL_DIR's latest) for later stages such as PPO:
    reward runs give {"backbone", "head"} (score with reward.rewards), DPO runs the policy params."""
    mesh = partitioning.make_mesh(cfg.mesh)
    template, axes = initial_params(cfg, models.param_shapes(cfg.model))
    optimizer = optim.make_adafactor(cfg.adafactor, optim.make_schedule(cfg.schedule))
    abstract, _ = state_shardings(template, axes, optimizer, cfg.mesh, mesh)
    directory, step = resolve_checkpoint(checkpoint or cfg.model_dir)
    state, _ = checkpointing.Checkpointer(directory, async_save=False).restore(abstract, step=step)
    return state["params"], step


# --- scores over a pool --------------------------------------------------------------------------------------------
def pool_scores(score_fn, params, pool: pairs.PairPool, batch_size: int) -> np.ndarray:
    """score_fn(params, batch) [B, 2] for every pair row of the pool -> [N, 2]."""
    out = np.zeros((len(pool), 2), np.float32)
    for index, batch in pairs.eval_batches(pool, batch_size):
        scores = np.asarray(score_fn(params, {k: batch[k] for k in ("inputs", "responses")}))
        real = index >= 0
        out[index[real]] = scores[real]
    return out


def preference_accuracy(scores: np.ndarray, pool: pairs.PairPool) -> dict:
    """{task: {"preference_accuracy": share of pairs scored chosen > rejected}} plus "mean" over tasks."""
    right = scores[:, 0] > scores[:, 1]
    results = {t: {"preference_accuracy": float(np.mean(right[pool.task == i]))} for i, t in enumerate(pool.tasks)
               if np.any(pool.task == i)}
    results["mean"] = {"preference_accuracy": float(np.mean([v["preference_accuracy"] for v in results.values()]))}
    return results


def cached_reference_logprobs(cfg: PreferenceConfig, score_fn, sft_params, pool: pairs.PairPool, name: str):
    """Reference (SFT) log-probs [N, 2] of a pool: computed once, kept in MODEL_DIR (a resumed run reads them)."""
    digest = hashlib.sha1(pool.inputs.tobytes() + pool.responses.tobytes()).hexdigest()[:16]
    path = epath.Path(cfg.model_dir) / f"reference_logprobs_{name}.npz"
    if path.exists():
        with path.open("rb") as f:
            saved = np.load(f)
            if str(saved["digest"]) == digest:
                return saved["logprobs"]
    logprobs = pool_scores(score_fn, sft_params, pool, cfg.pairs_per_batch)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez(f, logprobs=logprobs, digest=np.asarray(digest))
    return logprobs


def _fmt(results: dict) -> str:
    return ", ".join(f"{t} {v['preference_accuracy']:.3f}" for t, v in results.items())


def run(cfg: PreferenceConfig, *, stop_after_steps: Optional[int] = None) -> dict:
    """Trains to cfg.train_steps (resuming MODEL_DIR's latest checkpoint); returns {"initial", "final"} accuracies."""
    validate(cfg)
    tasks = pairs.task_names(cfg.mixture_or_task_name)
    check_vocabulary(cfg, tasks)
    mesh = partitioning.make_mesh(cfg.mesh)
    epath.Path(cfg.model_dir).mkdir(parents=True, exist_ok=True)
    train_pool = pairs.build_pool(tasks, "train", cfg.train_prompts_per_task, cfg.task_feature_lengths)
    eval_pool = pairs.build_pool(tasks, "validation", cfg.eval_prompts_per_task, cfg.task_feature_lengths)
    print(f"preference pools: train {train_pool.counters} | validation {eval_pool.counters}; "
          f"skipped records {preference_data.data_error_counts() or 'none'}", flush=True)

    sft_params = load_sft_params(cfg.model, cfg.init_checkpoint, cfg.mesh, mesh)
    policy_fn = jax.jit(lambda p, b: steps.policy_scores(cfg.model, p, b))
    reward_fn = jax.jit(lambda p, b: steps.reward_scores(cfg.model, p, b))
    score_fn = reward_fn if cfg.kind == "reward" else policy_fn
    if cfg.kind == "dpo":
        train_pool.reference = cached_reference_logprobs(cfg, policy_fn, sft_params, train_pool, "train")
        loss_fn = steps.make_dpo_loss(cfg.model, cfg.beta, cfg.loss_type)
    else:
        loss_fn = steps.make_reward_loss(cfg.model)

    schedule = optim.make_schedule(cfg.schedule)
    optimizer = optim.make_adafactor(cfg.adafactor, schedule)
    params, axes = initial_params(cfg, sft_params)
    abstract, shardings = state_shardings(params, axes, optimizer, cfg.mesh, mesh)
    ckpt = checkpointing.Checkpointer(cfg.model_dir, keep=cfg.keep_checkpoints, async_save=False)
    start = ckpt.latest_step() or 0
    if start:
        state, _ = ckpt.restore(abstract)
        print(f"resumed from {cfg.model_dir}/checkpoint_{start}", flush=True)
    else:
        state = jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": optimizer.init(p)},
                        out_shardings=shardings)(params)
    del sft_params, params
    train_step = jax.jit(steps.make_train_step(loss_fn, optimizer, cfg.seed), in_shardings=(shardings, None),
                         out_shardings=(shardings, None), donate_argnums=(0,))
    writer = MetricsWriter(cfg.model_dir)

    def evaluate(step):
        results = preference_accuracy(pool_scores(score_fn, state["params"], eval_pool, cfg.pairs_per_batch),
                                      eval_pool)
        for task, values in results.items():
            writer.write(step, "eval", task, values)
        print(f"eval step {step}: held-out preference accuracy {_fmt(results)}", flush=True)
        return results

    initial = evaluate(start)
    if start == 0:
        print(f"{'SFT policy' if cfg.kind == 'dpo' else 'untrained reward head'} level: "
              f"{initial['mean']['preference_accuracy']:.3f}", flush=True)
    batches = pairs.train_batches(train_pool, cfg.pairs_per_batch, cfg.seed, start_step=start)
    meta = lambda s: {"step": int(s), "seed": cfg.seed, "kind": cfg.kind}
    progress, step, window = ProgressPrinter(cfg.train_steps), start, time.time()
    results = initial
    try:
        while step < cfg.train_steps:
            batch = next(batches)
            state, metrics = train_step(state, _with_reference(batch, train_pool, cfg))
            step += 1
            if step % cfg.log_period == 0 or step == cfg.train_steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                sps = cfg.log_period / max(time.time() - window, 1e-9)
                values.update(steps_per_sec=sps, learning_rate=float(schedule(step - 1)))
                writer.write(step, "train", "all", values)
                progress.line(step, values["loss"], sps, {"accuracy": values["accuracy"]})
                window = time.time()
            if cfg.eval_period and step % cfg.eval_period == 0 and step < cfg.train_steps:
                results = evaluate(step)
            if cfg.checkpoint_period and step % cfg.checkpoint_period == 0:
                ckpt.save(step, state, meta(step))
            if stop_after_steps is not None and step - start >= stop_after_steps:
                break
        if step == cfg.train_steps:
            results = evaluate(step)
        ckpt.save(step, state, meta(step))
    finally:
        ckpt.close()
        writer.close()
    summary = {"initial": initial, "final": results, "start_step": start, "step": step}
    (epath.Path(cfg.model_dir) / f"{cfg.kind}_results.json").write_text(json.dumps(summary, indent=1))
    return summary


def _with_reference(batch: dict, pool: pairs.PairPool, cfg: PreferenceConfig) -> dict:
    index = batch.pop("index")
    if pool.reference is None:
        return batch
    ref = np.where((index >= 0)[:, None], pool.reference[np.maximum(index, 0)], 0.0).astype(np.float32)
    return {**batch, "reference_logprobs": ref}
