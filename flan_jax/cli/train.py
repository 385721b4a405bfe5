"""Gin edge of the trainer: `flan-jax train` / `flan-jax eval` / `python -m flan_jax.train`.

Flags follow T5X: --gin_file (repeatable), --gin.NAME=value (a macro or a binding such as --gin.train.seed=3),
--gin_bindings 'x = 1' (repeatable), --gin_search_paths a,b. Core code takes dataclasses; only this module knows gin.
"""
from __future__ import annotations

import argparse
import functools
import ast
import logging
import os
import sys
from typing import Optional, Sequence

import gin
import seqio
from etils import epath

from flan_jax import models
from flan_jax.pipeline import batches as data_lib
from flan_jax.evaluation import predictions
from flan_jax.train.metrics_log import MetricsWriter
from flan_jax.train import restore, loop, loss as loss_lib, optim, partitioning, step as step_lib
from gin import resource_reader
from flan_jax import packing
import dataclasses
from flan_jax.utils.user_modules import import_modules

REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                                        "gin_configs")

gin.external_configurable(models.T5Config, name="T5Config")
gin.external_configurable(models.DecoderConfig, name="DecoderConfig")
if hasattr(models, "PeftConfig"):  # gin_configs/peft/*.gin: train.peft = @PeftConfig()
    gin.external_configurable(models.PeftConfig, name="PeftConfig")


@functools.lru_cache(maxsize=None)
def _tolerate_namespace_packages_in_gin() -> None:
    """gin first looks up an include such as 'runs/finetune.gin' as a file inside a Python package named 'runs'. A
    plain folder of that name in the working directory (MODEL_DIR runs/default, say) is a namespace package with no
    file location, and gin then crashes with a TypeError instead of trying its search paths. Treat it as not found.

    Why a private name: gin registers this reader at import, ahead of any reader we could add (the public
    gin.config.register_file_reader only appends), and has no public way to remove or wrap one; its existence check
    catches ValueError but not the TypeError, so the parse function is the one place to turn one into the other."""
    original = resource_reader._parse_config_path

    def parse_config_path(config_path):
        try:
            return original(config_path)
        except TypeError:
            raise ValueError("not a file inside a package", config_path) from None

    resource_reader._parse_config_path = parse_config_path


@functools.lru_cache(maxsize=None)
def _register_converters() -> None:
    """Feature converters selectable from gin (registered once per process)."""
    gin.external_configurable(seqio.EncDecFeatureConverter, name="EncDecFeatureConverter", module="seqio")
    gin.external_configurable(packing.PackedPrefixLMFeatureConverter, name="PackedPrefixLMFeatureConverter",
                              module="flan_jax.packing")
    gin.external_configurable(packing.PackedEncDecFeatureConverter, name="PackedEncDecFeatureConverter",
                              module="flan_jax.packing")


@gin.configurable("train")
def train_config(
        model_dir: str = gin.REQUIRED,
        model = gin.REQUIRED,
        mixture_or_task_name: str = gin.REQUIRED,
        task_feature_lengths: dict = gin.REQUIRED,
        train_steps: int = gin.REQUIRED,
        batch_size: int = 32,
        eval_mixture_or_task_name: Optional[str] = None,
        learning_rate: float = 1e-3,
        schedule: str = "constant",
        warmup_steps: int = 0,
        eval_period: int = 0,
        eval_examples_per_task: int = 64,
        eval_batch_size: int = 32,
        eval_few_shot: int = 0,
        eval_calibrate: bool = False,
        checkpoint_period: int = 0,
        keep_checkpoints: int = 3,
        best_metric: Optional[str] = None,
        log_period: int = 10,
        num_partitions: int = 1,
        mesh_shape: Optional[Sequence[int]] = None,
        fsdp: bool = False,
        num_microbatches: int = 1,
        z_loss: float = 1e-4,
        label_smoothing: float = 0.0,
        loss_normalizing_factor=loss_lib.NUM_REAL_TARGET_TOKENS,  # None: un-normalized sum (T5X)
        head_chunk: Optional[int] = 32,  # decoder-only: head on loss positions only, in chunks (step.LossConfig)
        seed: int = 0,
        skip_nonfinite_updates: bool = False,
        async_checkpointing: bool = True,
        init_checkpoint: Optional[str] = None,
    input_sharding: str = "per_process_shard",
    input_pipeline: str = "seqio",
    restore_optimizer_state: bool = False,
    peak_tflops: Optional[float] = None,
    adafactor_multiply_by_parameter_scale: bool = True,
    adafactor_weight_decay_rate: Optional[float] = None,
    peft=None,
) -> loop.TrainConfig:
    """Collects the gin bindings into a TrainConfig (no work is done here; validation.py checks the values). Over 60
    lines: one parameter per `train.*` gin binding, the names runs' gin files use.

    peft: a PeftConfig (gin_configs/peft/*.gin) set on the model config, whichever family it is."""
    if peft is not None:
        model = dataclasses.replace(model, peft=peft)
    return loop.TrainConfig(
            model_dir=model_dir, model=model,
            input=data_lib.InputConfig(mixture_or_task_name, task_feature_lengths, batch_size, seed=seed,
                                     input_sharding=input_sharding, pipeline=input_pipeline),
            train_steps=train_steps, eval_mixture_or_task_name=eval_mixture_or_task_name,
            schedule=optim.ScheduleConfig(schedule, learning_rate, warmup_steps),
            loss=step_lib.LossConfig(z_loss, label_smoothing, loss_normalizing_factor, head_chunk),
            mesh=partitioning.MeshConfig(num_partitions, _mesh_shape(mesh_shape), fsdp),
            num_microbatches=num_microbatches, eval_period=eval_period, eval_examples_per_task=eval_examples_per_task,
            eval_batch_size=eval_batch_size, eval_few_shot=eval_few_shot, eval_calibrate=eval_calibrate,
            checkpoint_period=checkpoint_period, keep_checkpoints=keep_checkpoints,
            best_metric=best_metric, log_period=log_period, seed=seed, skip_nonfinite_updates=skip_nonfinite_updates,
            async_checkpointing=async_checkpointing, init_checkpoint=init_checkpoint,
            restore_optimizer_state=restore_optimizer_state, peak_tflops=peak_tflops,
            adafactor=optim.AdafactorConfig(multiply_by_parameter_scale=adafactor_multiply_by_parameter_scale,
                                            weight_decay_rate=adafactor_weight_decay_rate))


def _mesh_shape(mesh_shape):
    if mesh_shape is None:
        return None
    if not isinstance(mesh_shape, (list, tuple)) or not all(isinstance(x, int) and x > 0 for x in mesh_shape):
        raise ValueError(f"MESH_SHAPE (train.mesh_shape)={mesh_shape!r}: expected (data, model) positive ints")
    return tuple(mesh_shape)


@gin.configurable("feature_converter")
def make_feature_converter(converter=None):
    """The gin-selected feature converter; None lets the loop use best-fit packing (PackedEncDecFeatureConverter)."""
    return converter


@gin.configurable("distributed")
def maybe_init_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, auto: bool = False):
    """distributed.auto = True: `jax.distributed.initialize()` with no arguments (TPU pods, SLURM, Open MPI)."""
    partitioning.maybe_initialize_distributed(coordinator_address, num_processes, process_id, auto=auto)


# --- flags ---------------------------------------------------------------------------------------------------------
def _gin_literal(value: str) -> str:
    """Lets users write --gin.MODEL_DIR=runs/x without quotes; gin literals and references pass through."""
    v = value.strip()
    if v.startswith(("@", "%", "'", '"', "{", "[", "(")) or v in ("True", "False", "None"):
        return v
    try:
        ast.literal_eval(v)
        return v
    except (ValueError, SyntaxError):
        return repr(v)


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flan-jax", description=__doc__)
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="a gin binding, e.g. 'train.seed = 1'")
    parser.add_argument("--gin_search_paths", default="", help="comma-separated folders to find gin files in")
    parser.add_argument("--module", action="append", default=[],
                        help="a task-registration module to import first (repeatable; see flan_jax/user_modules.py)")
    parser.add_argument("--checkpoint", default=None, help="(eval) checkpoint_<step> dir, or MODEL_DIR for its latest")
    parser.add_argument("--predictions_dir", default=None,
                        help="(eval) write per-task predictions (and NIv2's official prediction file) here")
    args, rest = parser.parse_known_args(argv)
    args.overrides = []
    for item in rest:
        if not item.startswith("--gin.") or "=" not in item:
            parser.error(f"unrecognized argument {item!r} (expected --gin.NAME=value)")
        name, value = item[len("--gin."):].split("=", 1)
        args.overrides.append((name, _gin_literal(value)))
    return args


def configure_gin(args: argparse.Namespace) -> None:
    """Parses files then overrides; an unknown binding, macro or configurable fails here, naming it."""
    gin.clear_config()
    _tolerate_namespace_packages_in_gin()
    _register_converters()
    paths = [p for p in args.gin_search_paths.split(",") if p] + [os.getcwd(), REPO_GIN_DIR]
    for path in paths:
        gin.add_config_file_search_path(path)
    if not args.gin_file:
        raise ValueError("no --gin_file given (e.g. --gin_file=gin_configs/runs/default_cpu.gin)")
    # gin logs an ERROR for every search path that lacks an included file before finding it; hide that noise
    # (a file missing everywhere still raises).
    logging.disable(logging.ERROR)
    try:
        gin.parse_config_files_and_bindings(args.gin_file, args.gin_bindings, finalize_config=False)
    finally:
        logging.disable(logging.NOTSET)
    for name, value in args.overrides:
        if "." not in name and "/" not in name:  # a macro: it must already be defined by the gin files
            try:
                gin.query_parameter(f"{name}/gin.macro.value")
            except ValueError:
                raise ValueError(f"--gin.{name}: no macro {name} is defined in {args.gin_file}") from None
        gin.parse_config(f"{name} = {value}")
    gin.finalize()


def _setup(argv):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = parse_flags(argv)
    import_modules(args.module)  # before gin: its tasks may be named by MIXTURE_OR_TASK_NAME
    configure_gin(args)
    maybe_init_distributed()
    # Keep TensorFlow (data pipeline only) off accelerators and from grabbing their memory.
    import tensorflow as tf  # lazy: TensorFlow takes seconds to import; only the input pipeline needs it
    tf.config.set_visible_devices([], "GPU")
    return args


class ConfigError(ValueError):
    """A configuration problem found before any training work; printed as one line naming the key."""


def _configured(argv):
    """Flags -> gin -> TrainConfig, validated. Any failure becomes a ConfigError naming what is wrong."""
    try:
        args = _setup(argv)
        cfg = train_config()
        loop.validate_config(cfg, __import__("jax").device_count())
        return args, cfg
    except (ValueError, TypeError, KeyError, FileNotFoundError, OSError) as e:
        raise ConfigError(_one_line(e)) from e


def load_config(argv):
    """(flags, validated TrainConfig) from gin flags, for entry points outside train/ (eval-suite)."""
    return _configured(argv)


def _one_line(e: Exception) -> str:
    """First line of the error plus gin's note of which configurable it came from (it names the key's owner)."""
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()] or [repr(e)]
    where = next((l for l in lines[1:] if l.startswith("In call to configurable")), "")
    return lines[0] + (f" ({where.rstrip(':')})" if where else "")


def save_vocabulary(cfg) -> Optional[str]:
    """Copies a SentencePiece training vocabulary to MODEL_DIR/vocabulary.model: the run directory alone is then
    enough to decode, evaluate or export the model, whatever cache the vocabulary was built in."""
    vocab = seqio.get_mixture_or_task(cfg.input.mixture_or_task_name).output_features["targets"].vocabulary
    if not isinstance(vocab, seqio.SentencePieceVocabulary):
        return None
    path = epath.Path(cfg.model_dir) / "vocabulary.model"  # epath: gs:// model dirs too
    path.write_bytes(vocab.sp_model)
    return str(path)


def train_main(argv: Sequence[str]) -> dict:
    _, cfg = _configured(argv)
    epath.Path(cfg.model_dir, "config.gin").write_text(gin.config_str())
    save_vocabulary(cfg)
    results = loop.run(cfg, feature_converter=make_feature_converter())
    epath.Path(cfg.model_dir, "config.gin").write_text(gin.operative_config_str())
    return results


def eval_main(argv: Sequence[str]) -> dict:
    args, cfg = _configured(argv)
    return run_eval(cfg, args.checkpoint or cfg.model_dir, predictions_dir=args.predictions_dir)


def restore_trained(cfg, checkpoint: Optional[str]):
    """(params, step, vocabulary) of a checkpoint (default: MODEL_DIR's latest), restored as `flan-jax eval` does."""
    params, step = restore.restore_params(cfg, checkpoint or cfg.model_dir)
    vocab = seqio.get_mixture_or_task(cfg.input.mixture_or_task_name).output_features["targets"].vocabulary
    return params, step, vocab


def load_trained_model(argv: Sequence[str]):
    """(TrainConfig, params, step, vocabulary) from eval-style flags (--gin_file ... --checkpoint PATH): the public
    way for inference tools (flan_jax.generation) to load a checkpoint exactly as `flan-jax eval` does."""
    args, cfg = _configured(argv)
    return (cfg, *restore_trained(cfg, args.checkpoint))


def _cli(fn, name: str, argv) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        results = fn(argv)
    except ConfigError as e:
        print(f"flan-jax {name}: config error: {e}", file=sys.stderr)
        return 2
    if name == "eval":
        for task, values in results.items():
            print(task + "\t" + "\t".join(f"{k}={v:.4f}" for k, v in sorted(values.items())))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return _cli(train_main, "train", argv)


def eval_cli(argv: Optional[Sequence[str]] = None) -> int:
    return _cli(eval_main, "eval", argv)


def run_eval(cfg: loop.TrainConfig, checkpoint: str, predictions_dir: str = None) -> dict:
    if not cfg.eval_mixture_or_task_name:
        raise ValueError("EVAL_MIXTURE_OR_TASK_NAME is not set in the gin config")
    params, step = restore.restore_params(cfg, checkpoint)
    evaluator = loop.make_evaluator(cfg)
    results = evaluator.evaluate(params)
    if predictions_dir:
        for path in predictions.write_predictions(evaluator, predictions_dir):
            print(f"wrote {path}")
    writer = MetricsWriter(cfg.model_dir)
    loop.log_eval(writer, step, results)
    writer.close()
    return results
