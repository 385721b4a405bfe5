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
from flan_jax.checkpoints import run_dir as trained_checkpoints
from flan_jax.train import checkpointing, optim, partitioning, peft_state as peft, step as step_lib
from flan_jax.pipeline import batches as data_lib
from flan_jax.train.metrics_log import MetricsWriter, ProgressPrinter
from flan_jax.train import validation
from flan_jax.evaluation.evaluator import base_task_name
from flan_jax.train import init_from
from flan_jax.evaluation import evaluator as evaluator_lib
from flan_jax.train.flops import measure_matmul_peak_tflops


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
    validation.validate_config(cfg, num_devices)


def seen_base_tasks(mixture_or_task_name: str) -> set:
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
    session = _Session(cfg, feature_converter)
    try:
        while session.step < cfg.train_steps:
            session.train_one_step()
            if stop_after_steps is not None and session.step - session.start >= stop_after_steps:
                break
        session.finish()
    finally:
        session.close()
    return session.last_eval


class _LogWindow:
    """Steps, tokens, batch statistics and paused seconds (eval, checkpoints) since the last train log line."""

    def __init__(self):
        self.started, self.steps, self.tokens, self.stats, self.paused = time.time(), 0, 0, [], 0.0

    def add(self, host_batch) -> None:
        self.stats.append(data_lib.batch_statistics(host_batch))
        self.tokens += sum(data_lib.token_counts(host_batch))
        self.steps += 1

    def seconds(self) -> float:
        return max(time.time() - self.started - self.paused, 1e-9)  # training steps only

    def mean_stats(self) -> dict:
        return {k: float(np.mean([s[k] for s in self.stats])) for k in self.stats[0]}


class _Session:
    """One training call's parts (state, input, step function, evaluator, checkpointer, metrics) and its actions."""

    def __init__(self, cfg: TrainConfig, feature_converter: Optional[seqio.FeatureConverter]):
        self.cfg = cfg
        self.mesh = partitioning.make_mesh(cfg.mesh)
        self.converter = (models.feature_converter(cfg.model, seed=cfg.seed) if feature_converter is None
                          else feature_converter)
        peft.check_converter(cfg.model, self.converter)
        self.schedule = optim.make_schedule(cfg.schedule)
        optimizer = optim.make_adafactor(cfg.adafactor, self.schedule)
        self.ckpt = checkpointing.Checkpointer(cfg.model_dir, keep=cfg.keep_checkpoints,
                                               async_save=cfg.async_checkpointing, best_metric=cfg.best_metric)
        self.writer = MetricsWriter(cfg.model_dir)
        self.base = None  # PEFT: the frozen base beside the trainable state (train/peft.py)
        if peft.enabled(cfg.model):
            self.state, shardings, self.start, self.base = peft.init_or_restore(cfg, optimizer, self.mesh, self.ckpt)
            self.extra_meta = peft.meta(self.base)  # the base reference; the PEFT config comes from the run's gin
        else:
            self.state, shardings, self.start = _init_or_restore(cfg, optimizer, self.mesh, self.ckpt)
            # The model config rides along so `flan-jax convert` and INIT_CHECKPOINT need nothing but the checkpoint.
            self.extra_meta = {"model": trained_checkpoints.model_record(cfg.model,
                                                                         data_lib.targets_vocabulary(cfg.input))}
        self.batch_sharding = partitioning.batch_sharding(self.mesh)
        self.train_step = self._jit_step(optimizer, shardings)
        self._open_input()
        self.evaluator = make_evaluator(cfg) if cfg.eval_mixture_or_task_name else None
        self.peak_tflops = cfg.peak_tflops or measure_matmul_peak_tflops(cfg.model.dtype) * jax.device_count()
        self.progress = ProgressPrinter(cfg.train_steps)
        self.parameter_counts = peft.parameter_counts(cfg.model)
        self.last_eval: dict = {}
        self.step = self.start
        self.window = _LogWindow()
        self.metrics = None

    def _jit_step(self, optimizer, shardings):
        cfg = self.cfg
        step_fn = step_lib.make_train_step(cfg.model, optimizer, cfg.loss, num_microbatches=cfg.num_microbatches,
                                           seed=cfg.seed, skip_nonfinite_updates=cfg.skip_nonfinite_updates)
        if self.base is not None:
            return peft.jit_train_step(step_fn, shardings, self.batch_sharding, self.base)
        return jax.jit(step_fn, in_shardings=(shardings, self.batch_sharding), out_shardings=(shardings, None),
                       donate_argnums=(0,))

    def _open_input(self) -> None:
        cfg = self.cfg
        self.shard = partitioning.data_shard(self.mesh)
        self.fingerprint = dict(data_lib.input_fingerprint(cfg.input, self.shard),
                                packing=repr(sorted(getattr(self.converter, "packing_options", {}).items())))
        # Resume: continue the input from its saved position (O(1) in the step), else replay to it.
        input_state = (checkpointing.load_input_state(cfg.model_dir, self.start, self.fingerprint)
                       if self.start else None)
        self.batches = data_lib.train_batches(cfg.input, self.converter, skip_batches=self.start, shard=self.shard,
                                              input_state=input_state)

    def meta(self, step) -> dict:
        return {"step": int(step), "seed": self.cfg.seed, "batches_consumed": int(step), **self.extra_meta}

    # -- the steps ---------------------------------------------------------------------------------------------

    def train_one_step(self) -> None:
        cfg = self.cfg
        host_batch = next(self.batches)
        self.window.add(host_batch)
        batch = partitioning.global_batch_from_local(host_batch, self.batch_sharding, cfg.input.global_batch_size)
        self.state, self.metrics = self.train_step(self.state, batch)
        self.step += 1
        step = self.step
        if step % cfg.log_period == 0 or step == cfg.train_steps:
            self.log_train()
            self.check_finite()
        if self.evaluator and cfg.eval_period and step % cfg.eval_period == 0 and step < cfg.train_steps:
            self.timed("eval_seconds", self.evaluate)
        if cfg.checkpoint_period and step % cfg.checkpoint_period == 0:
            self.check_finite()
            self.timed("checkpoint_seconds", self.save)

    def finish(self) -> None:
        self.check_finite()
        if self.evaluator and self.step == self.cfg.train_steps:
            self.timed("eval_seconds", self.evaluate)
        self.timed("checkpoint_seconds", self.save)

    def close(self) -> None:
        self.ckpt.close()
        self.writer.close()

    # -- logging, eval, checkpoints ----------------------------------------------------------------------------

    def log_train(self) -> None:
        cfg, window = self.cfg, self.window
        values = {k: float(v) for k, v in jax.device_get(self.metrics).items() if k != "finite"}
        steps_per_sec = window.steps / window.seconds()
        # The schedule's own count: after a T5X restore it continues from T5X's step, not the loop's.
        values.update({"steps_per_sec": steps_per_sec,
                       # processes sharing a data shard read the same rows: count them once per process
                       "tokens_per_sec": window.tokens * self.shard.count / window.seconds(),
                       "learning_rate": optim.applied_learning_rate(self.schedule, self.state["opt_state"], self.step)})
        stats = window.mean_stats()
        values["tflops_per_sec"] = self.flops_per_row(stats) * cfg.input.global_batch_size * steps_per_sec / 1e12
        values["mfu"] = values["tflops_per_sec"] / self.peak_tflops
        values.update(stats)
        values.update(data_lib.pipeline_counters(self.converter))
        values.update(self.parameter_counts)
        self.writer.write(self.step, "train", "all", values)
        for task, errors in data_lib.data_errors_by_task(cfg.input.split).items():
            self.writer.write(self.step, "train", task, errors)
        self.progress.line(self.step, values["loss"], steps_per_sec)
        self.window = _LogWindow()

    def flops_per_row(self, stats: dict) -> float:
        """Train FLOPs (3x forward) of one row: every token slot through the model. With the decoder's sparse head
        (LossConfig.head_chunk) the output head is counted at the loss positions only, as it runs there."""
        lengths = self.cfg.input.task_feature_lengths
        head_positions = None
        if step_lib.uses_sparse_head(self.cfg.model, self.cfg.loss) and "loss_fraction" in stats:
            head_positions = stats["loss_fraction"] * (lengths["inputs"] + lengths["targets"])
        return 3 * models.flops_per_example(self.cfg.model, lengths["inputs"], lengths["targets"],
                                            head_positions=head_positions)

    def timed(self, metric, fn) -> None:
        """fn(), its seconds logged as train metric `metric` (unless fn returns False: nothing was done) and left out
        of the throughput of the log window it falls in."""
        t0 = time.time()
        result = fn()
        spent = time.time() - t0
        self.window.paused += spent
        if result is not False:
            self.writer.write(self.step, "train", "all", {metric: spent})

    def save(self):
        saved = self.ckpt.save(self.step, self.state, self.meta(self.step))
        if saved:
            position = self.batches.state()
            if position is not None:
                checkpointing.save_input_state(self.cfg.model_dir, self.step, self.fingerprint, position,
                                               keep_steps=self.ckpt.latest.all_steps())
        return saved

    def check_finite(self) -> None:
        bad = int(self.state["nonfinite_step"])
        if bad >= 0 and not self.cfg.skip_nonfinite_updates:
            self.ckpt.wait()
            raise NonFiniteLossError(
                    f"loss or gradients not finite at step {bad}; stopped before step {self.step} was checkpointed. "
                    f"Last good checkpoint: {self.ckpt.latest_step()} in {self.cfg.model_dir}. Lower LEARNING_RATE "
                    "or set SKIP_NONFINITE_UPDATES=True to skip such updates.")

    def evaluate(self) -> None:
        results = self.evaluator.evaluate(peft.full_params(self.state, self.base))
        flat = log_eval(self.writer, self.step, results)
        self.last_eval = results
        self.check_finite()
        self.ckpt.maybe_save_best(self.step, self.state, self.meta(self.step), flat)
        seen, held = results.get("mean_seen", {}), results.get("mean_heldout", {})
        if jax.process_index() == 0:
            print(f"eval step {self.step}: mean_seen {fmt(seen)} | mean_heldout {fmt(held)}", flush=True)


def fmt(values: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(values.items())) or "-"
