"""Reward-model and DPO training: start from an SFT checkpoint, train on a preference pool, evaluate held-out
preference accuracy, checkpoint and resume, all through the SFT loop's Trainer (train/trainer.py)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Optional

import jax
import numpy as np
from etils import epath

from flan_jax import models
from flan_jax.data import preference as preference_data
from flan_jax.train import checkpointing, optim, partitioning, state as state_lib, trainer as trainer_lib
from flan_jax.train.metrics_log import MetricsWriter
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
    """The params of an SFT train-state checkpoint (written by flan_jax.train.loop), laid out as training lays them."""
    directory, step = resolve_checkpoint(path)
    checkpoint_dir = os.path.join(directory, f"{checkpointing.STEP_PREFIX}_{step}")
    try:
        return checkpointing.restore_params(checkpoint_dir, state_lib.abstract_params(model_cfg, mesh_cfg, mesh))
    except Exception as e:  # orbax raises several types for a tree that does not fit
        raise ValueError(f"INIT_CHECKPOINT={path}: checkpoint_{step} does not fit the gin model config "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def check_vocabulary(cfg: PreferenceConfig, tasks) -> None:
    """The preference tasks must tokenize as the SFT run did (its MODEL_DIR keeps vocabulary.model)."""
    saved = epath.Path(resolve_checkpoint(cfg.init_checkpoint)[0]) / "vocabulary.model"
    vocab = preference_data.preference_spec(tasks[0]).vocabulary
    if saved.exists() and hasattr(vocab, "sp_model") and vocab.sp_model != saved.read_bytes():
        raise ValueError(f"INIT_CHECKPOINT={cfg.init_checkpoint}: its vocabulary.model differs from the vocabulary "
                         f"of task {tasks[0]!r}; the policy would read other token ids")


# --- state --------------------------------------------------------------------------------------------------------
def initial_params(cfg: PreferenceConfig, sft_params):
    if cfg.kind == "reward":
        return reward.reward_params(cfg.model, sft_params), reward.reward_logical_axes(cfg.model)
    return sft_params, models.param_logical_axes(cfg.model)


def state_layout(cfg: PreferenceConfig, params, axes, optimizer, mesh) -> state_lib.StateLayout:
    """The train-state layout (train/state.py) of preference params (arrays or ShapeDtypeStructs) and their axes."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return state_lib.layout(shapes, axes, optimizer, cfg.mesh, mesh)


def load_trained(cfg: PreferenceConfig, checkpoint: Optional[str] = None) -> tuple[dict, int]:
    """(params, step) of a preference run's checkpoint (default: MODEL_DIR's latest) for later stages such as PPO:
    reward runs give {"backbone", "head"} (score with reward.rewards), DPO runs the policy params."""
    mesh = partitioning.make_mesh(cfg.mesh)
    template, axes = initial_params(cfg, models.param_shapes(cfg.model))
    abstract = state_layout(cfg, template, axes, state_lib.no_optimizer(), mesh).abstract
    directory, step = resolve_checkpoint(checkpoint or cfg.model_dir)
    checkpoint_dir = os.path.join(directory, f"{checkpointing.STEP_PREFIX}_{step}")
    return checkpointing.restore_params(checkpoint_dir, abstract["params"]), step


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
    with _build_trainer(cfg, mesh, train_pool, eval_pool) as trainer:
        trainer.timed("eval_seconds", trainer.evaluate)
        initial = trainer.last_eval
        if trainer.start == 0:
            print(f"{'SFT policy' if cfg.kind == 'dpo' else 'untrained reward head'} level: "
                  f"{initial['mean']['preference_accuracy']:.3f}", flush=True)
        final = trainer.run(stop_after_steps)
    summary = {"initial": initial, "final": final, "start_step": trainer.start, "step": trainer.step}
    (epath.Path(cfg.model_dir) / f"{cfg.kind}_results.json").write_text(json.dumps(summary, indent=1))
    return summary


def _build_trainer(cfg: PreferenceConfig, mesh, train_pool: pairs.PairPool,
                   eval_pool: pairs.PairPool) -> trainer_lib.Trainer:
    """The loop of a reward-model or DPO run from the SFT checkpoint (or resumed from MODEL_DIR's latest)."""
    sft_params = load_sft_params(cfg.model, cfg.init_checkpoint, cfg.mesh, mesh)
    policy_fn = jax.jit(lambda p, b: steps.policy_scores(cfg.model, p, b))
    if cfg.kind == "dpo":
        train_pool.reference = cached_reference_logprobs(cfg, policy_fn, sft_params, train_pool, "train")
        loss_fn, score_fn = steps.make_dpo_loss(cfg.model, cfg.beta, cfg.loss_type), policy_fn
    else:
        loss_fn = steps.make_reward_loss(cfg.model)
        score_fn = jax.jit(lambda p, b: steps.reward_scores(cfg.model, p, b))
    schedule = optim.make_schedule(cfg.schedule)
    optimizer = optim.make_adafactor(cfg.adafactor, schedule)
    params, axes = initial_params(cfg, sft_params)
    layout = state_layout(cfg, params, axes, optimizer, mesh)
    ckpt = checkpointing.Checkpointer(cfg.model_dir, keep=cfg.keep_checkpoints, async_save=False)
    resumed = ckpt.restore_latest(layout.abstract)
    if resumed is not None:
        state, meta = resumed
        start = int(meta["step"])
        print(f"resumed from {cfg.model_dir}/checkpoint_{start}", flush=True)
    else:
        state, start = state_lib.init_on_mesh(lambda p: p, optimizer, layout, params), 0
    del sft_params, params
    train_step = state_lib.jit_step(steps.make_train_step(loss_fn, optimizer, cfg.seed), layout, None)
    hooks = _PreferenceHooks(cfg, score_fn, train_pool, eval_pool)
    periods = trainer_lib.Periods(cfg.train_steps, cfg.log_period, cfg.eval_period, cfg.checkpoint_period)
    batches = pairs.train_batches(train_pool, cfg.pairs_per_batch, cfg.seed, start_step=start)
    return trainer_lib.Trainer(state, train_step, batches, start=start, periods=periods, hooks=hooks, ckpt=ckpt,
                               writer=MetricsWriter(cfg.model_dir), schedule=schedule)


class _PreferenceHooks(trainer_lib.Hooks):
    """Reward model and DPO in the loop: pair batches (with DPO's reference log-probs), held-out preference accuracy."""
    progress_keys = ("accuracy",)
    pause_metrics = False
    has_eval = True
    nonfinite_hint = "Lower LEARNING_RATE."

    def __init__(self, cfg: PreferenceConfig, score_fn, train_pool: pairs.PairPool, eval_pool: pairs.PairPool):
        self.cfg, self.score_fn, self.train_pool, self.eval_pool = cfg, score_fn, train_pool, eval_pool

    def device_batch(self, host_batch):
        return _with_reference(host_batch, self.train_pool, self.cfg)

    def evaluate(self, state) -> dict:
        scores = pool_scores(self.score_fn, state["params"], self.eval_pool, self.cfg.pairs_per_batch)
        return preference_accuracy(scores, self.eval_pool)

    def eval_line(self, step: int, results: dict) -> str:
        return f"eval step {step}: held-out preference accuracy {_fmt(results)}"

    def meta(self, step: int) -> dict:
        return {"step": int(step), "seed": self.cfg.seed, "kind": self.cfg.kind}


def _with_reference(batch: dict, pool: pairs.PairPool, cfg: PreferenceConfig) -> dict:
    index = batch.pop("index")
    if pool.reference is None:
        return batch
    ref = np.where((index >= 0)[:, None], pool.reference[np.maximum(index, 0)], 0.0).astype(np.float32)
    return {**batch, "reference_logprobs": ref}
