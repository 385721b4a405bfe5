"""SFT and PEFT training: TrainConfig, and `run` (build state, input and hooks, then the loop of train/trainer.py).

The step and the state's layout come from train/program.py, the builder `flan-jax compile` lowers, so what compiles
for a topology is what trains. A run resumes MODEL_DIR's latest checkpoint (input position included), else starts
fresh or from INIT_CHECKPOINT; PEFT trains params['peft'] on a frozen base (train/peft_state.py).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import jax
import numpy as np
import seqio

from flan_jax import models
from flan_jax.checkpoints import run_dir as trained_checkpoints
from flan_jax.evaluation import evaluator as evaluator_lib
from flan_jax.evaluation.evaluator import base_task_name
from flan_jax.pipeline import batches as data_lib
from flan_jax.train import (checkpointing, executable, init_from, optim, partitioning, peft_state as peft,
                            program as program_lib, state as state_lib, step as step_lib, trainer as trainer_lib,
                            validation)
from flan_jax.train.flops import measure_matmul_peak_tflops
from flan_jax.train.metrics_log import MetricsWriter, truncate_metrics
from flan_jax.train.trainer import Interrupted, NonFiniteLossError, log_eval  # noqa: F401  (callers take them from here)


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
    best_mode: Optional[str] = None    # 'min' or 'max'; None: 'min' for loss, ece, perplexity metrics, else 'max'
    log_period: int = 10
    seed: int = 0
    skip_nonfinite_updates: bool = False
    async_checkpointing: bool = True
    init_checkpoint: Optional[str] = None  # a T5X or HF checkpoint to finetune from (see train/init_from.py)
    restore_optimizer_state: bool = False  # T5X only: also restore Adafactor slots and step
    peak_tflops: Optional[float] = None    # all devices together; None: measured with a matmul at start-up
    # XLA's exec_time_optimization_effort for the train step, in [-1, 1] (0: XLA's default). -1 compiles the step
    # several times faster (docs/tpu-fit.md: T5 base on v5e:2x2 in 37 s instead of 331) for a program that may run
    # slower and take somewhat more memory; `flan-jax compile --quick` compiles with -1.
    compile_effort: float = 0.0
    # A directory `flan-jax compile --save_executable` wrote: its step is loaded instead of compiled when it was made
    # for this very program and these devices (train/executable.py); otherwise the step is compiled as usual.
    compiled_step_dir: Optional[str] = None


def validate_config(cfg: TrainConfig, num_devices: int) -> None:
    """Every check that can fail before any work, each naming its config key (see train/validation.py)."""
    validation.validate_config(cfg, num_devices)


def seen_base_tasks(mixture_or_task_name: str) -> set:
    return {base_task_name(t.name) for t in seqio.get_subtasks(seqio.get_mixture_or_task(mixture_or_task_name))}


def abstract_train_state(model_cfg, optimizer, mesh_cfg: partitioning.MeshConfig, mesh):
    """(abstract state, sharding tree) of a state training all of a model's parameters: state.layout as a pair."""
    full = state_lib.layout(models.param_shapes(model_cfg), models.param_logical_axes(model_cfg), optimizer, mesh_cfg,
                            mesh)
    return full.abstract, full.shardings


def make_evaluator(cfg: TrainConfig):
    """The periodic evaluator of cfg (EVAL_MIXTURE_OR_TASK_NAME, examples per task, batch, few-shot, calibration)."""
    return evaluator_lib.Evaluator(
        cfg.eval_mixture_or_task_name, cfg.input.task_feature_lengths, cfg.model,
        seen_base_tasks=seen_base_tasks(cfg.input.mixture_or_task_name), examples_per_task=cfg.eval_examples_per_task,
        batch_size=cfg.eval_batch_size,
        options=evaluator_lib.EvalOptions(few_shot=cfg.eval_few_shot, calibrate=cfg.eval_calibrate))


def run(cfg: TrainConfig, *, feature_converter: Optional[seqio.FeatureConverter] = None,
        stop_after_steps: Optional[int] = None) -> dict:
    """Trains to cfg.train_steps (resuming from MODEL_DIR if it holds a checkpoint). Returns the last eval results.

    stop_after_steps: stop (after checkpointing) once this many steps were run in this call; used to test resume.
    """
    validate_config(cfg, jax.device_count())
    with build_trainer(cfg, feature_converter) as trainer:
        return trainer.run(stop_after_steps)


def build_trainer(cfg: TrainConfig, feature_converter: Optional[seqio.FeatureConverter] = None
                  ) -> trainer_lib.Trainer:
    """The loop of one SFT or PEFT run: the program's jitted step on the initialized or resumed state."""
    mesh = partitioning.make_mesh(cfg.mesh)
    converter = (models.feature_converter(cfg.model, seed=cfg.seed) if feature_converter is None
                 else feature_converter)
    peft.check_converter(cfg.model, converter)
    prog = program_lib.build(cfg, mesh, converter=converter)
    if cfg.compiled_step_dir:
        prog = _with_saved_step(cfg, prog)
    ckpt = checkpointing.Checkpointer(cfg.model_dir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing,
                                      best_metric=cfg.best_metric, best_mode=cfg.best_mode)
    state, start, base = _init_or_restore(cfg, prog, ckpt)
    truncate_metrics(cfg.model_dir, start)  # this run writes the steps after `start` again
    step_fn = prog.jitted if base is None else (lambda state_, batch: prog.jitted(state_, batch, base.params))
    hooks = _SftHooks(cfg, converter, partitioning.data_shard(mesh), prog.batch_sharding, base, start)
    periods = trainer_lib.Periods(cfg.train_steps, cfg.log_period, cfg.eval_period, cfg.checkpoint_period)
    return trainer_lib.Trainer(state, step_fn, hooks.batches, start=start, periods=periods, hooks=hooks, ckpt=ckpt,
                               writer=MetricsWriter(cfg.model_dir), schedule=optim.make_schedule(cfg.schedule),
                               skip_nonfinite_updates=cfg.skip_nonfinite_updates)


def _with_saved_step(cfg: TrainConfig, prog: program_lib.StepProgram) -> program_lib.StepProgram:
    loaded = executable.load(prog.jitted, prog.abstract_args(), list(prog.mesh.devices.flat), cfg.compiled_step_dir,
                             cfg.compile_effort, log=logging.warning)
    return prog if loaded is None else dataclasses.replace(prog, jitted=loaded)


def _init_or_restore(cfg: TrainConfig, prog: program_lib.StepProgram, ckpt: checkpointing.Checkpointer):
    """(state, first step, PEFT's frozen base or None): resume MODEL_DIR's latest checkpoint, else initialize (or
    load INIT_CHECKPOINT)."""
    if peft.enabled(cfg.model):
        return peft.init_or_restore(cfg, prog.layout, prog.optimizer, ckpt)
    resumed = ckpt.restore_latest(prog.layout.abstract)
    if resumed is not None:
        state, meta = resumed
        logging.info("resumed from %s/checkpoint_%d", cfg.model_dir, meta["step"])
        return state, int(meta["step"]), None
    state = state_lib.init_on_mesh(lambda rng: models.init_params(cfg.model, rng), prog.optimizer, prog.layout,
                                   jax.random.PRNGKey(cfg.seed))
    if cfg.init_checkpoint:
        state = _from_init_checkpoint(cfg, state, prog.layout)
    return state, 0, None


def _from_init_checkpoint(cfg: TrainConfig, state: dict, layout: state_lib.StateLayout) -> dict:
    """`state` with INIT_CHECKPOINT's params (and, if asked, T5X's optimizer state)."""
    params, opt_state, _ = init_from.initial_params_and_opt_state(
        cfg.init_checkpoint, cfg.model, jax.device_get(state["opt_state"]), cfg.restore_optimizer_state,
        vocabulary=data_lib.targets_vocabulary(cfg.input))
    cast = lambda tree, ref: jax.tree.map(lambda x, a: np.asarray(x, a.dtype), tree, ref)
    state["params"] = jax.device_put(cast(params, layout.abstract["params"]), layout.shardings["params"])
    if opt_state is not None:
        state["opt_state"] = jax.device_put(cast(opt_state, layout.abstract["opt_state"]), layout.shardings["opt_state"])
    # The loop's step stays 0 (TRAIN_STEPS counts finetuning steps); Adafactor's own count carries T5X's step.
    return state


class _SftHooks(trainer_lib.Hooks):
    """SFT's part of the loop: packed input with a saved position, throughput and MFU figures, the evaluator."""

    def __init__(self, cfg: TrainConfig, converter, shard, batch_sharding, base: Optional[peft.FrozenBase],
                 start: int):
        self.cfg, self.converter, self.shard, self.batch_sharding, self.base = cfg, converter, shard, batch_sharding, base
        self.fingerprint = dict(data_lib.input_fingerprint(cfg.input, shard),
                                packing=repr(sorted(getattr(converter, "packing_options", {}).items())))
        # Resume: continue the input from its saved position (O(1) in the step), else replay to it.
        input_state = checkpointing.load_input_state(cfg.model_dir, start, self.fingerprint) if start else None
        self.batches = data_lib.train_batches(cfg.input, converter, skip_batches=start, shard=shard,
                                              input_state=input_state)
        self.evaluator = make_evaluator(cfg) if cfg.eval_mixture_or_task_name else None
        self._data_reported = False
        self.has_eval = self.evaluator is not None
        self.peak_tflops = cfg.peak_tflops or measure_matmul_peak_tflops(cfg.model.dtype) * jax.device_count()
        self.parameter_counts = peft.parameter_counts(cfg.model)
        if base is not None:  # the base reference; the PEFT config comes from the run's gin
            self.extra_meta = peft.meta(base)
        else:  # the model config rides along so `flan-jax convert` and INIT_CHECKPOINT need only the checkpoint
            self.extra_meta = {"model": trained_checkpoints.model_record(cfg.model,
                                                                         data_lib.targets_vocabulary(cfg.input))}
        self.stats, self.tokens = [], 0   # of the log window's batches

    def device_batch(self, host_batch):
        self.stats.append(data_lib.batch_statistics(host_batch))
        self.tokens += sum(data_lib.token_counts(host_batch))
        return partitioning.global_batch_from_local(host_batch, self.batch_sharding, self.cfg.input.global_batch_size)

    def train_values(self, step: int, seconds: float, steps_per_sec: float) -> dict:
        stats = {k: float(np.mean([s[k] for s in self.stats])) for k in self.stats[0]}
        # processes sharing a data shard read the same rows: count them once per process
        values = {"tokens_per_sec": self.tokens * self.shard.count / seconds}
        values["tflops_per_sec"] = (self.flops_per_row(stats) * self.cfg.input.global_batch_size * steps_per_sec
                                    / 1e12)
        values["mfu"] = values["tflops_per_sec"] / self.peak_tflops
        values.update(stats)
        values.update(data_lib.pipeline_counters(self.converter))
        values.update(self.parameter_counts)
        self.stats, self.tokens = [], 0
        return values

    def after_train_log(self, step: int, writer: MetricsWriter) -> None:
        for task, errors in data_lib.data_errors_by_task(self.cfg.input.split).items():
            writer.write(step, "train", task, errors)

    def flops_per_row(self, stats: dict) -> float:
        """Train FLOPs (3x forward) of one row: every token slot through the model. With the decoder's sparse head
        (LossConfig.head_chunk) the output head is counted at the loss positions only, as it runs there."""
        lengths = self.cfg.input.task_feature_lengths
        head_positions = None
        if step_lib.uses_sparse_head(self.cfg.model, self.cfg.loss) and "loss_fraction" in stats:
            head_positions = stats["loss_fraction"] * (lengths["inputs"] + lengths["targets"])
        return 3 * models.flops_per_example(self.cfg.model, lengths["inputs"], lengths["targets"],
                                            head_positions=head_positions)

    def evaluate(self, state) -> dict:
        return self.evaluator.evaluate(peft.full_params(state, self.base))

    def eval_line(self, step: int, results: dict) -> str:
        seen, held = results.get("mean_seen", {}), results.get("mean_heldout", {})
        line = f"eval step {step}: mean_seen {fmt(seen)} | mean_heldout {fmt(held)}"
        if self._data_reported:
            return line
        self._data_reported = True   # once, at the first eval: what the data has cost so far (the end summary repeats)
        return "\n".join([line, *data_lines(data_lib.pipeline_counters(self.converter),
                                             data_lib.data_errors_by_task(self.cfg.input.split))])

    def meta(self, step: int) -> dict:
        return {"step": int(step), "seed": self.cfg.seed, "batches_consumed": int(step), **self.extra_meta}

    def after_save(self, step: int, kept_steps) -> None:
        position = self.batches.state()
        if position is not None:
            checkpointing.save_input_state(self.cfg.model_dir, step, self.fingerprint, position, keep_steps=kept_steps)


PACKING_COUNTS = (("packing_truncated", "truncated"), ("packing_dropped_overlength", "dropped (over length)"),
                  ("packing_dropped_empty", "dropped (empty)"))


def data_lines(packing: dict, errors: dict, data_label: str = "  data so far:",
               skipped_label: str = "  skipped") -> list:
    """Console lines on what the data cost: examples packed, truncated and dropped (packing's counters), and each
    task's skipped records by reason ({task: {"data_errors": n, "data_errors/<reason>": n}})."""
    lines = []
    if "packing_examples_in" in packing:
        parts = [f"{int(packing[key]):,} {label}" for key, label in PACKING_COUNTS if packing.get(key)]
        lines.append(f"{data_label} {int(packing['packing_examples_in']):,} examples packed; "
                     + (", ".join(parts) if parts else "none truncated or dropped"))
    for task, values in sorted(errors.items()):
        reasons = ", ".join(f"{k.split('/', 1)[1]} {int(v):,}" for k, v in sorted(values.items()) if "/" in k)
        lines.append(f"{skipped_label} {task}: {int(values['data_errors']):,} records ({reasons})")
    return lines


def fmt(values: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(values.items())) or "-"
