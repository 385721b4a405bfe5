"""Pre-flight checks of a TrainConfig: everything that can be wrong is found before any work, each error naming its
config key (the gin macro where there is one, else the binding) in one line."""
from __future__ import annotations

import difflib
import logging
import math
import numbers
import os
import shutil
from typing import Any

import numpy as np

from flan_jax.evaluation.evaluator import base_task_name
from flan_jax.pipeline import native as native_pipeline
from flan_jax.pipeline.cache import grain_input
from flan_jax import models
from flan_jax.pipeline import batches as data_lib
from flan_jax.train import loss as loss_lib, optim, partitioning
import seqio
import jax

SCHEDULES = ("constant", "warmup_constant", "rsqrt")
AGGREGATES = ("mean_seen", "mean_heldout")


class ConfigValueError(ValueError):
    pass


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigValueError(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def check_int(key: str, value: Any, minimum: int) -> None:
    _need(_is_int(value) and value >= minimum, f"{key}={value!r}: expected an int >= {minimum}")


def check_real(key: str, value: Any, low: float, high: float = math.inf, *, high_open: bool = False) -> None:
    ok = _is_real(value) and low <= value and (value < high if high_open else value <= high)
    bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
    _need(ok, f"{key}={value!r}: expected a finite number in {bound}")


def reported_metrics(eval_mixture_or_task_name: str, calibrate: bool = False) -> list:
    """Metric names the evaluator will report, in the order the eval tasks report them: 'loss', then what each task's
    metric functions return (and, with calibration, ece, calibrated_ece and calibrated_<metric>)."""
    names = {"loss": None}  # a dict keeps first-seen order
    for task in seqio.get_subtasks(seqio.get_mixture_or_task(eval_mixture_or_task_name)):
        for fn in task.predict_metric_fns or task.metric_fns:
            try:
                names.update(dict.fromkeys(fn(["x"], ["x"]).keys()))
            except Exception:  # a metric that cannot score a toy pair still exists; accept any name for it
                names["*"] = None
    if calibrate:
        plain = [n for n in names if n not in ("loss", "*")]
        names.update(dict.fromkeys(["ece", "calibrated_ece"] + [f"calibrated_{n}" for n in plain]))
    return list(names)


def metric_names(eval_mixture_or_task_name: str, calibrate: bool = False) -> set:
    return set(reported_metrics(eval_mixture_or_task_name, calibrate))


def eval_groups(cfg) -> list:
    """The result keys a BEST_METRIC may start with: the aggregates the evaluator will fill, then each eval task."""
    tasks = [t.name for t in seqio.get_subtasks(seqio.get_mixture_or_task(cfg.eval_mixture_or_task_name))]
    seen = {base_task_name(t.name) for t in seqio.get_subtasks(
        seqio.get_mixture_or_task(cfg.input.mixture_or_task_name))}
    flags = {base_task_name(t) in seen for t in tasks}
    return [agg for agg, want in zip(AGGREGATES, (True, False)) if want in flags] + tasks


def default_best_metric(cfg):
    """'<first aggregate>/<first metric the eval tasks report>', or None where only the loss (lower is better, while
    best/ keeps the highest) or unnamed metrics are reported."""
    metrics = [m for m in reported_metrics(cfg.eval_mixture_or_task_name, cfg.eval_calibrate)
               if m not in ("loss", "*")]
    return f"{eval_groups(cfg)[0]}/{metrics[0]}" if metrics else None


def best_metric_reported(cfg) -> bool:
    """Whether the evaluator will report cfg.best_metric (True when there is nothing to check)."""
    if not cfg.best_metric or not cfg.eval_mixture_or_task_name or "/" not in str(cfg.best_metric):
        return True
    group, metric = cfg.best_metric.rsplit("/", 1)
    names = metric_names(cfg.eval_mixture_or_task_name, cfg.eval_calibrate)
    return group in eval_groups(cfg) and (metric in names or "*" in names)


def check_model(model) -> None:
    if not isinstance(model, models.T5Config):
        return  # DecoderConfig validates its own fields in __post_init__
    for field in ("vocab_size", "emb_dim", "num_heads", "num_encoder_layers", "num_decoder_layers", "head_dim",
                  "mlp_dim", "relative_attention_num_buckets", "relative_attention_max_distance"):
        check_int(f"T5Config.{field}", getattr(model, field), 1)
    check_real("DROPOUT_RATE (T5Config.dropout_rate)", model.dropout_rate, 0.0, 1.0, high_open=True)


def check_vocabulary(model, task_or_mixture, key: str) -> None:
    """Every token id the data can produce must have an embedding row (else XLA silently clamps the gather); an
    embedding over four times the vocabulary is legal but most likely a wrong vocabulary, so it is flagged."""
    model_key = f"{type(model).__name__}.vocab_size"
    for feature in ("inputs", "targets"):
        vocab = task_or_mixture.output_features[feature].vocabulary
        _need(vocab.vocab_size <= model.vocab_size,
              f"{model_key}={model.vocab_size} is smaller than the {feature!r} vocabulary of {key}="
              f"{task_or_mixture.name!r} ({type(vocab).__name__}, {vocab.vocab_size} ids)")
        if vocab.vocab_size * 4 < model.vocab_size:
            warn_once(f"{model_key}={model.vocab_size} embedding rows for the {vocab.vocab_size}-id "
                      f"{type(vocab).__name__} of {task_or_mixture.name!r}: most rows will never be used; is this "
                      f"the intended vocabulary?")


_WARNED = set()


def warn_once(message: str) -> None:
    """Logs a warning once per process: a config is checked again by each entry point it passes through."""
    if message not in _WARNED:
        _WARNED.add(message)
        logging.warning(message)


def validate_config(cfg, num_devices: int) -> None:
    """Raises ConfigValueError naming the first bad key. `cfg` is a loop.TrainConfig."""
    _check_counts(cfg)
    _check_optimization(cfg)
    check_model(cfg.model)
    if getattr(cfg.model, "peft", None) is not None:
        _need(not cfg.restore_optimizer_state, "train.restore_optimizer_state=True with train.peft: the optimizer "
              "holds state for the PEFT parameters only, so a base checkpoint's Adafactor slots have no place")
    _check_lengths(cfg.input.task_feature_lengths)
    _check_mesh_and_batch(cfg, num_devices)
    _check_tasks(cfg)
    _check_best_metric(cfg)
    _check_model_dir(cfg)


def _check_counts(cfg) -> None:
    """Steps, periods, sizes and the seed."""
    check_int("TRAIN_STEPS", cfg.train_steps, 1)
    check_int("BATCH_SIZE", cfg.input.global_batch_size, 1)
    check_int("SEED", cfg.seed, 0)
    _need(cfg.seed < 2 ** 32, f"SEED={cfg.seed}: expected < 2**32")
    for key, value in (("EVAL_PERIOD", cfg.eval_period), ("CHECKPOINT_PERIOD", cfg.checkpoint_period),
                       ("train.warmup_steps", cfg.schedule.warmup_steps)):
        check_int(key, value, 0)
    for key, value in (("LOG_PERIOD", cfg.log_period), ("NUM_MICROBATCHES", cfg.num_microbatches),
                       ("EVAL_EXAMPLES_PER_TASK", cfg.eval_examples_per_task),
                       ("train.eval_batch_size", cfg.eval_batch_size), ("train.keep_checkpoints", cfg.keep_checkpoints)):
        check_int(key, value, 1)
    check_int("train.eval_few_shot", cfg.eval_few_shot, 0)
    _need(isinstance(cfg.eval_calibrate, bool), f"train.eval_calibrate={cfg.eval_calibrate!r}: expected True or False")


def _check_optimization(cfg) -> None:
    """Learning rate and schedule, loss options, and the boolean switches."""
    check_real("LEARNING_RATE", cfg.schedule.learning_rate, 0.0)
    _need(cfg.schedule.learning_rate > 0, f"LEARNING_RATE={cfg.schedule.learning_rate}: must be positive")
    _need(cfg.schedule.kind in SCHEDULES, f"train.schedule={cfg.schedule.kind!r}: expected one of {SCHEDULES}")
    optim.make_schedule(cfg.schedule)
    check_real("train.z_loss", cfg.loss.z_loss, 0.0)
    check_real("train.label_smoothing", cfg.loss.label_smoothing, 0.0, 1.0, high_open=True)
    norm = cfg.loss.normalizer
    _need(norm is None or (isinstance(norm, str) and norm.lower() in loss_lib.NORMALIZER_NAMES)
          or (_is_real(norm) and norm > 0),
          f"train.loss_normalizing_factor={norm!r}: expected None (un-normalized sum), a positive number or one of "
          f"{loss_lib.NORMALIZER_NAMES}")
    if cfg.loss.head_chunk is not None:
        check_int("train.head_chunk", cfg.loss.head_chunk, 1)
    check_real("train.compile_effort", cfg.compile_effort, -1.0, 1.0)
    _need(isinstance(cfg.mesh.fsdp, bool), f"train.fsdp={cfg.mesh.fsdp!r}: expected True or False")
    for flag in ("skip_nonfinite_updates", "async_checkpointing", "restore_optimizer_state"):
        _need(isinstance(getattr(cfg, flag), bool), f"train.{flag}={getattr(cfg, flag)!r}: expected True or False")


def _check_lengths(lengths) -> None:
    _need(isinstance(lengths, dict) and {"inputs", "targets"} <= set(lengths),
          f"TASK_FEATURE_LENGTHS={lengths!r}: expected {{'inputs': int, 'targets': int}}")
    for key in ("inputs", "targets"):
        check_int(f"TASK_FEATURE_LENGTHS[{key!r}]", lengths[key], 1)


def _check_mesh_and_batch(cfg, num_devices: int) -> None:
    """The mesh fits the devices, and the batch splits over data parallelism, processes and microbatches."""
    check_int("NUM_PARTITIONS", cfg.mesh.num_partitions, 1)
    try:
        dp, _ = partitioning.validate_mesh(cfg.mesh, num_devices)
    except (TypeError, ValueError) as e:
        raise ConfigValueError(str(e)) from None
    _need(cfg.input.global_batch_size % dp == 0,
          f"BATCH_SIZE={cfg.input.global_batch_size} is not divisible by the data-parallel size {dp}")
    _check_data_layout(cfg, num_devices)
    _need(cfg.input.global_batch_size % cfg.num_microbatches == 0,
          f"NUM_MICROBATCHES={cfg.num_microbatches} does not divide BATCH_SIZE={cfg.input.global_batch_size}")


def _check_tasks(cfg) -> None:
    """The input pipeline's options, and the train and eval tasks exist and fit the model's vocabulary."""
    _need(cfg.input.pipeline in native_pipeline.PIPELINES,
          f"train.input_pipeline={cfg.input.pipeline!r}: expected one of {native_pipeline.PIPELINES}")
    _need(cfg.input.input_sharding in data_lib.INPUT_SHARDINGS,
          f"train.input_sharding={cfg.input.input_sharding!r}: expected one of {data_lib.INPUT_SHARDINGS}")
    for key, name in (("MIXTURE_OR_TASK_NAME", cfg.input.mixture_or_task_name),
                      ("EVAL_MIXTURE_OR_TASK_NAME", cfg.eval_mixture_or_task_name)):
        if key == "MIXTURE_OR_TASK_NAME" or name:
            check_vocabulary(cfg.model, data_lib.resolve_mixture_or_task(name, key=key), key)
    _need(cfg.input.pipeline != "cache" or isinstance(cfg.input.cache_dir, str) and cfg.input.cache_dir,
          "train.input_pipeline='cache' needs train.input_cache_dir: the directory of a preprocessed cache (built "
          f"with `flan-jax data cache`); got train.input_cache_dir={cfg.input.cache_dir!r}")
    _need(isinstance(cfg.input.workers, int) and cfg.input.workers >= 0
          and (cfg.input.workers == 0 or cfg.input.pipeline == "cache"),
          f"train.input_workers={cfg.input.workers!r}: Grain worker processes serve train.input_pipeline='cache' "
          "only; expected 0, or a count >= 1 with the cache pipeline")
    if cfg.input.pipeline in ("native", "cache"):
        try:
            native_pipeline.registry_components(cfg.input.mixture_or_task_name)
        except ValueError as e:
            raise ConfigValueError(str(e)) from None
    if cfg.input.pipeline == "cache":  # the cache serves this run (a CacheError names what differs)
        try:
            grain_input.check_cache(cfg.input.cache_dir, sorted(native_pipeline.registry_components(
                    cfg.input.mixture_or_task_name)), cfg.input.split, cfg.input.task_feature_lengths)
        except grain_input.CacheError as e:
            raise ConfigValueError(f"train.input_cache_dir={cfg.input.cache_dir!r}: {e}") from None


def _check_best_metric(cfg) -> None:
    if cfg.best_metric is None:
        return
    _need(isinstance(cfg.best_metric, str) and "/" in cfg.best_metric,
          f"BEST_METRIC={cfg.best_metric!r}: expected '<task>/<metric>', e.g. 'mean_seen/accuracy'")
    if best_metric_reported(cfg):
        return
    metrics = [m for m in reported_metrics(cfg.eval_mixture_or_task_name, cfg.eval_calibrate) if m != "*"]
    valid = [f"{group}/{m}" for group in eval_groups(cfg)[:2] for m in metrics]
    close = difflib.get_close_matches(cfg.best_metric, valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigValueError(f"BEST_METRIC={cfg.best_metric!r}: the eval tasks report {metrics}; {hint}valid names "
                           f"include {valid} (or <task>/<metric>, or None to keep no best checkpoint)")


def _check_data_layout(cfg, num_devices: int) -> None:
    """Multi-host: every process must feed a whole block of data-parallel rows (see partitioning.data_shard)."""
    if jax.process_count() == 1 or num_devices != jax.device_count():
        return
    key = "MESH_SHAPE" if cfg.mesh.mesh_shape is not None else "NUM_PARTITIONS"
    try:
        shard = partitioning.data_shard(partitioning.make_mesh(cfg.mesh), key)
        data_lib.local_batch_size(cfg.input.global_batch_size, shard)
    except ValueError as e:
        raise ConfigValueError(str(e)) from None


def checkpoint_bytes(model, min_dim_size_to_factor: int = 128) -> int:
    """Size of one checkpoint: params, plus Adafactor's float32 slots (row + column vectors for factored matrices,
    a full second moment for the rest)."""
    total = 0
    for shape in jax.tree.leaves(jax.tree.map(lambda s: s.shape, models.param_shapes(model),
                                              is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)),
                                 is_leaf=lambda x: isinstance(x, tuple)):
        size = int(np.prod(shape))
        total += size * np.dtype(model.param_dtype).itemsize
        factored = len(shape) >= 2 and sorted(shape)[-2] >= min_dim_size_to_factor
        total += 4 * (sum(shape) if factored else size)
    return total


def _check_model_dir(cfg) -> None:
    _need(isinstance(cfg.model_dir, str) and cfg.model_dir != "", f"MODEL_DIR={cfg.model_dir!r}: expected a path")
    # The run directory's lock, metrics log and input positions are local files (appended, renamed, locked with
    # O_EXCL), which object stores do not offer: a bucket is used through a mount.
    _need("://" not in cfg.model_dir,
          f"MODEL_DIR={cfg.model_dir!r}: a URL; mount the bucket (e.g. gcsfuse) and give the mounted path "
          f"(docs/tpu.md)")
    try:
        os.makedirs(cfg.model_dir, exist_ok=True)
    except OSError as e:
        raise ConfigValueError(f"MODEL_DIR={cfg.model_dir!r} cannot be created: {e.strerror or e}") from None
    _need(os.access(cfg.model_dir, os.W_OK), f"MODEL_DIR={cfg.model_dir!r} is not writable")
    free = shutil.disk_usage(cfg.model_dir).free
    need = checkpoint_bytes(cfg.model)
    _need(free >= need, f"MODEL_DIR={cfg.model_dir!r}: {free / 2**30:.2f} GiB free, a checkpoint needs about "
                        f"{need / 2**30:.2f} GiB")
