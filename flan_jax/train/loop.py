"""The training loop: build state and data, step, log, evaluate, checkpoint, resume. Plain functions over TrainConfig."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from flan_jax import models
from flan_jax.checkpoints import trained as trained_checkpoints
from flan_jax.train import checkpointing, data as data_lib, optim, partitioning, peft, step as step_lib
from flan_jax.train.metrics_log import MetricsWriter, ProgressPrinter


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model_dir: str
    model: Any  # a model config (flan_jax.models: T5Config, DecoderConfig)
    input: data_lib.InputConfig
    train_steps: int
    eval_mixture_or_task_name: Optional[str] = None
    schedule: optim.ScheduleConfig = optim.ScheduleConfig()
    adafactor: optim.AdafactorConfig = optim.AdafactorConfig()
    loss: step_lib.LossConfig = step_lib.LossConfig()
    mesh: partitioning.MeshConfig = partitioning.MeshConfig()
    num_microbatches: int = 1
    eval_period: int = 0            # 0: only at the end
    eval_examples_per_task: int = 64
    eval_batch_size: int = 32
    eval_few_shot: int = 0          # k train-split exemplars before every eval input (0: zero-shot)
    eval_calibrate: bool = False    # rank tasks also report ece, calibrated_<metric>, calibrated_ece
    checkpoint_period: int = 0      # 0: only at the end
    keep_checkpoints: int = 3
    best_metric: Optional[str] = None  # e.g. "mean_seen/accuracy"
    log_period: int = 10
    seed: int = 0
    skip_nonfinite_updates: bool = False
    async_checkpointing: bool = True
    init_checkpoint: Optional[str] = None  # a T5X or HF checkpoint to finetune from (see train/init_from.py)
    restore_optimizer_state: bool = False  # T5X only: also restore Adafactor slots and step
    peak_tflops: Optional[float] = None    # all devices together; None: measured with a matmul at start-up


class NonFiniteLossError(RuntimeError):
    pass


def validate_config(cfg: TrainConfig, num_devices: int) -> None:
    """Every check that can fail before any work, each naming its config key (see train/validation.py)."""
    from flan_jax.train import validation
    validation.validate_config(cfg, num_devices)


def seen_base_tasks(mixture_or_task_name: str) -> set:
    from flan_jax.evaluation.evaluator import base_task_name
    return {base_task_name(t.name) for t in seqio.get_subtasks(seqio.get_mixture_or_task(mixture_or_task_name))}


def _abstract_state(cfg: TrainConfig, optimizer, mesh):
    if peft.enabled(cfg.model):  # PEFT params and their optimizer state only (train/peft.py)
        return peft.abstract_train_state(cfg.model, optimizer, cfg.mesh, mesh)[:2]
    return abstract_train_state(cfg.model, optimizer, cfg.mesh, mesh)


def abstract_train_state(model_cfg, optimizer, mesh_cfg: partitioning.MeshConfig, mesh):
    """(abstract state with shardings, sharding tree) of the train state, without allocating it."""
    shapes = jax.eval_shape(lambda rng: step_lib.init_state(model_cfg, optimizer, rng), jax.random.PRNGKey(0))
    rules = partitioning.logical_rules(mesh_cfg)
    axes = models.param_logical_axes(model_cfg)
    shardings = {
            "step": partitioning.replicated(mesh),
            "nonfinite_step": partitioning.replicated(mesh),
            "params": partitioning.param_shardings(shapes["params"], axes, rules, mesh),
            "opt_state": partitioning.opt_state_shardings(shapes["opt_state"], shapes["params"], axes, rules, mesh),
    }
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract, shardings


def _init_or_restore(cfg, optimizer, mesh, ckpt: checkpointing.Checkpointer):
    """(state, shardings, first step): resume MODEL_DIR's latest checkpoint, else initialize (or load INIT_CHECKPOINT)."""
    abstract, shardings = _abstract_state(cfg, optimizer, mesh)
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract)
        logging.info("resumed from %s/checkpoint_%d", cfg.model_dir, meta["step"])
        return state, shardings, int(meta["step"])
    init = jax.jit(lambda rng: step_lib.init_state(cfg.model, optimizer, rng), out_shardings=shardings)
    state = init(jax.random.PRNGKey(cfg.seed))
    if cfg.init_checkpoint:
        from flan_jax.train import init_from
        params, opt_state, step = init_from.initial_params_and_opt_state(
            cfg.init_checkpoint, cfg.model, jax.device_get(state["opt_state"]), cfg.restore_optimizer_state,
            vocabulary=data_lib.targets_vocabulary(cfg.input))
        cast = lambda tree, ref: jax.tree.map(lambda x, a: np.asarray(x, a.dtype), tree, ref)
        state["params"] = jax.device_put(cast(params, abstract["params"]), shardings["params"])
        if opt_state is not None:
            state["opt_state"] = jax.device_put(cast(opt_state, abstract["opt_state"]), shardings["opt_state"])
        # The loop's step stays 0 (TRAIN_STEPS counts finetuning steps); Adafactor's own count carries T5X's step.
    return state, shardings, 0


def make_evaluator(cfg: TrainConfig):
    """The periodic evaluator of cfg (EVAL_MIXTURE_OR_TASK_NAME, examples per task, batch, few-shot, calibration)."""
    from flan_jax.evaluation import evaluator as evaluator_lib
    return evaluator_lib.Evaluator(
        cfg.eval_mixture_or_task_name, cfg.input.task_feature_lengths, cfg.model,
        seen_base_tasks=seen_base_tasks(cfg.input.mixture_or_task_name), examples_per_task=cfg.eval_examples_per_task,
        batch_size=cfg.eval_batch_size,
        options=evaluator_lib.EvalOptions(few_shot=cfg.eval_few_shot, calibrate=cfg.eval_calibrate))


def log_eval(writer: MetricsWriter, step: int, results: dict) -> dict:
    flat = {}
    for task, values in results.items():
        writer.write(step, "eval", task, values)
        flat.update({f"{task}/{m}": v for m, v in values.items()})
    return flat


def run(cfg: TrainConfig, *, feature_converter: Optional[seqio.FeatureConverter] = None,
        stop_after_steps: Optional[int] = None) -> dict:
    """Trains to cfg.train_steps (resuming from MODEL_DIR if it holds a checkpoint). Returns the last eval results.

    stop_after_steps: stop (after checkpointing) once this many steps were run in this call; used to test resume.
    """
    validate_config(cfg, jax.device_count())
    mesh = partitioning.make_mesh(cfg.mesh)
    if feature_converter is None:
        feature_converter = models.feature_converter(cfg.model, seed=cfg.seed)
    converter = feature_converter
    peft.check_converter(cfg.model, converter)
    optimizer = optim.make_adafactor(cfg.adafactor, optim.make_schedule(cfg.schedule))
    schedule = optim.make_schedule(cfg.schedule)
    ckpt = checkpointing.Checkpointer(cfg.model_dir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing,
                                                                        best_metric=cfg.best_metric)
    writer = MetricsWriter(cfg.model_dir)
    base = None  # PEFT: the frozen base beside the trainable state (train/peft.py)
    if peft.enabled(cfg.model):
        state, shardings, start, base = peft.init_or_restore(cfg, optimizer, mesh, ckpt)
        extra_meta = peft.meta(base)  # the base reference; the PEFT config comes from the run's gin
    else:
        state, shardings, start = _init_or_restore(cfg, optimizer, mesh, ckpt)
        # The model config rides along so `flan-jax convert` and INIT_CHECKPOINT need nothing but the checkpoint.
        extra_meta = {"model": trained_checkpoints.model_record(cfg.model, data_lib.targets_vocabulary(cfg.input))}
    meta = lambda s: {"step": int(s), "seed": cfg.seed, "batches_consumed": int(s), **extra_meta}

    batch_sharding = partitioning.batch_sharding(mesh)
    step_fn = step_lib.make_train_step(cfg.model, optimizer, cfg.loss, num_microbatches=cfg.num_microbatches,
                                       seed=cfg.seed, skip_nonfinite_updates=cfg.skip_nonfinite_updates)
    if base is not None:
        train_step = peft.jit_train_step(step_fn, shardings, batch_sharding, base)
    else:
        train_step = jax.jit(step_fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                             donate_argnums=(0,))
    shard = partitioning.data_shard(mesh)
    fingerprint = dict(data_lib.input_fingerprint(cfg.input, shard),
                       packing=repr(sorted(getattr(converter, "packing_options", {}).items())))
    # Resume: continue the input from its saved position (native pipeline; O(1) in the step), else replay to it.
    input_state = checkpointing.load_input_state(cfg.model_dir, start, fingerprint) if start else None
    batches = data_lib.train_batches(cfg.input, converter, skip_batches=start, shard=shard, input_state=input_state)

    def save(step):
        saved = ckpt.save(step, state, meta(step))
        if saved:
            position = batches.state()
            if position is not None:
                checkpointing.save_input_state(cfg.model_dir, step, fingerprint, position,
                                               keep_steps=ckpt.latest.all_steps())
        return saved

    evaluator = make_evaluator(cfg) if cfg.eval_mixture_or_task_name else None

    flops_per_row = 3 * models.flops_per_example(cfg.model, cfg.input.task_feature_lengths["inputs"],
                                                                                                    cfg.input.task_feature_lengths["targets"])
    from flan_jax.train.flops import measure_matmul_peak_tflops
    peak_tflops = cfg.peak_tflops or measure_matmul_peak_tflops(cfg.model.dtype) * jax.device_count()
    progress = ProgressPrinter(cfg.train_steps)
    parameter_counts = peft.parameter_counts(cfg.model)
    last_eval: dict = {}

    def check_finite(step):
        bad = int(state["nonfinite_step"])
        if bad >= 0 and not cfg.skip_nonfinite_updates:
            ckpt.wait()
            raise NonFiniteLossError(
                    f"loss or gradients not finite at step {bad}; stopped before step {step} was checkpointed. "
                    f"Last good checkpoint: {ckpt.latest_step()} in {cfg.model_dir}. Lower LEARNING_RATE or set "
                    f"SKIP_NONFINITE_UPDATES=True to skip such updates.")

    def evaluate(step):
        nonlocal last_eval
        results = evaluator.evaluate(peft.full_params(state, base))
        flat = log_eval(writer, step, results)
        last_eval = results
        check_finite(step)
        ckpt.maybe_save_best(step, state, meta(step), flat)
        seen, held = results.get("mean_seen", {}), results.get("mean_heldout", {})
        if jax.process_index() == 0:
            print(f"eval step {step}: mean_seen {fmt(seen)} | mean_heldout {fmt(held)}", flush=True)

    def timed(metric, fn, *args):
        """fn(*args), its seconds logged as train metric `metric` (unless fn returns False: nothing was done) and
        left out of the throughput of the log window it falls in."""
        nonlocal window_paused
        t0 = time.time()
        result = fn(*args)
        spent = time.time() - t0
        window_paused += spent
        if result is not False:
            writer.write(step, "train", "all", {metric: spent})
        return result

    step = start
    window_t, window_steps, window_tokens, window_stats = time.time(), 0, [0, 0], []
    window_paused = 0.0  # seconds of eval and checkpointing in this window
    try:
        while step < cfg.train_steps:
            host_batch = next(batches)
            window_stats.append(data_lib.batch_statistics(host_batch))
            enc, dec = data_lib.token_counts(host_batch)
            window_tokens[0] += enc
            window_tokens[1] += dec
            batch = partitioning.global_batch_from_local(host_batch, batch_sharding, cfg.input.global_batch_size)
            state, metrics = train_step(state, batch)
            step += 1
            window_steps += 1
            if step % cfg.log_period == 0 or step == cfg.train_steps:
                m = jax.device_get(metrics)
                elapsed = max(time.time() - window_t - window_paused, 1e-9)  # training steps only
                sps = window_steps / elapsed
                n_proc_tokens = (window_tokens[0] + window_tokens[1]) * shard.count  # processes sharing a shard: same rows
                values = {k: float(v) for k, v in m.items() if k != "finite"}
                # The schedule's own count: after a T5X restore it continues from T5X's step, not the loop's.
                lr = optim.applied_learning_rate(schedule, state["opt_state"], step)
                values.update({"steps_per_sec": sps, "tokens_per_sec": n_proc_tokens / elapsed, "learning_rate": lr,
                                              "tflops_per_sec": flops_per_row * cfg.input.global_batch_size * sps / 1e12})
                # MFU counts the FLOPs of every token slot of the packed rows against the measured peak.
                values["mfu"] = values["tflops_per_sec"] / peak_tflops
                values.update({k: float(np.mean([s[k] for s in window_stats])) for k in window_stats[0]})
                values.update(data_lib.pipeline_counters(converter))
                values.update(parameter_counts)
                writer.write(step, "train", "all", values)
                for task, errors in data_lib.data_errors_by_task(cfg.input.split).items():
                    writer.write(step, "train", task, errors)
                progress.line(step, values["loss"], sps)
                window_t, window_steps, window_tokens, window_stats = time.time(), 0, [0, 0], []
                window_paused = 0.0
                check_finite(step)
            if evaluator and cfg.eval_period and step % cfg.eval_period == 0 and step < cfg.train_steps:
                timed("eval_seconds", evaluate, step)
            if cfg.checkpoint_period and step % cfg.checkpoint_period == 0:
                check_finite(step)
                timed("checkpoint_seconds", save, step)
            if stop_after_steps is not None and step - start >= stop_after_steps:
                break
        check_finite(step)
        if evaluator and step == cfg.train_steps:
            timed("eval_seconds", evaluate, step)
        timed("checkpoint_seconds", save, step)
    finally:
        ckpt.close()
        writer.close()
    return last_eval


def fmt(values: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(values.items())) or "-"
