"""Gin edge of the trainer: `flan-jax train` / `flan-jax eval` / `python -m flan_jax.train`.

Flags follow T5X (flan_jax/utils/gin_flags.py): --gin_file (repeatable), --gin.NAME=value (a macro or a binding such
as --gin.train.seed=3), --gin_bindings 'x = 1' (repeatable), --gin_search_paths a,b. Core code takes dataclasses;
only this module knows gin. `flan-jax train` prints a start banner and an end summary (flan_jax/cli/train.py console).
"""
from __future__ import annotations

import argparse
import errno
import functools
import inspect
import json
import logging
import os
import re
import sys
from typing import Optional, Sequence

import gin
import jax
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
from flan_jax.train import run_guard, validation
from flan_jax.utils import gin_flags
from flan_jax.cli import console
from flan_jax.utils.gin_flags import REPO_GIN_DIR, parse_flags  # noqa: F401  (parse_flags: callers take it here)
from flan_jax.utils.user_modules import import_modules

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
    input_cache_dir: Optional[str] = None,  # input_pipeline='cache': the preprocessed cache (`flan-jax data cache`)
    input_workers: int = 0,  # input_pipeline='cache': Grain worker processes reading, packing and batching
    restore_optimizer_state: bool = False,
    peak_tflops: Optional[float] = None,
    compile_effort: float = 0.0,
    compiled_step_dir: Optional[str] = None,
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
                                     input_sharding=input_sharding, pipeline=input_pipeline,
                                     cache_dir=input_cache_dir, workers=input_workers),
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
            compile_effort=compile_effort, compiled_step_dir=compiled_step_dir,
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
def configure_gin(args: argparse.Namespace) -> None:
    """Parses files then overrides; an unknown binding, macro or configurable fails here, naming it (and the closest
    defined name). The --module names become gin `import` lines, so the run's config.gin imports them on reading."""
    gin.clear_config()
    _tolerate_namespace_packages_in_gin()
    _register_converters()
    for path in gin_flags.search_paths(args.gin_search_paths):
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
    for name in getattr(args, "module", []):
        gin.parse_config(f"import {_module_name(name)}")
    for name, value in args.overrides:
        if "." not in name and "/" not in name:  # a macro: it must already be defined by the gin files
            try:
                gin.query_parameter(f"{name}/gin.macro.value")
            except ValueError:
                hint = gin_flags.did_you_mean(name, _defined_macros(args))
                raise ValueError(f"--gin.{name}: no macro {name} is defined in {args.gin_file}{hint}") from None
        try:
            gin.parse_config(f"{name} = {value}")
        except ValueError as e:
            raise ValueError(f"--gin.{name}: {_one_line(e)}{_binding_hint(name)}") from None
    gin.finalize()


def _module_name(name: str) -> str:
    """The importable name of a --module value (a path/to/mod.py is imported by its stem; see user_modules)."""
    return os.path.basename(name)[:-3] if name.endswith(".py") else name


def _defined_macros(args: argparse.Namespace) -> list:
    try:
        return list(gin_flags.macro_values(args.gin_file, gin_flags.search_paths(args.gin_search_paths)))
    except (OSError, SyntaxError, ValueError):
        return []


def _binding_hint(name: str) -> str:
    """' (did you mean X?)' for a binding CONFIGURABLE.PARAM whose configurable or parameter is unknown.

    Why a private name: gin has no public listing of registered configurables; _REGISTRY is the map it matches
    selectors against, and a hint is only a courtesy, so any change there just drops the hint."""
    selector, _, param = name.rpartition(".")
    registry = getattr(gin.config, "_REGISTRY", None)
    if not selector or registry is None:
        return ""
    try:
        configurable = registry.get_match(selector)
    except Exception:  # noqa: BLE001  (an ambiguous selector: no single configurable to look into)
        return ""
    if configurable is None:
        names = {n for full, _ in registry.items() for n in (full, full.rsplit(".", 1)[-1])}
        return gin_flags.did_you_mean(selector, names)
    try:
        params = inspect.signature(configurable.wrapped).parameters
    except (TypeError, ValueError):
        return ""
    return gin_flags.did_you_mean(param, params).replace("did you mean ", f"did you mean {selector}.")


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
        cfg = _resolve_best_metric(args, train_config())
        loop.validate_config(cfg, jax.device_count())
        return args, cfg
    except (ValueError, TypeError, KeyError, FileNotFoundError, OSError) as e:
        raise ConfigError(_one_line(e)) from e


_BEST_METRIC_BINDING = re.compile(r"^\s*(BEST_METRIC|train\.best_metric)\s*=", re.MULTILINE)


def _best_metric_is_explicit(args: argparse.Namespace) -> bool:
    """Whether the user chose BEST_METRIC (flag, binding or a gin file of theirs), not the repo's default."""
    if any(name in ("BEST_METRIC", "train.best_metric") for name, _ in args.overrides):
        return True
    if any(_BEST_METRIC_BINDING.search(b) for b in args.gin_bindings):
        return True
    for name in args.gin_file:
        path = os.path.abspath(name if os.path.isfile(name) else os.path.join(REPO_GIN_DIR, name))
        if not path.startswith(REPO_GIN_DIR + os.sep) and os.path.isfile(path):
            with open(path) as f:
                if _BEST_METRIC_BINDING.search(f.read()):
                    return True
    return False


def _resolve_best_metric(args: argparse.Namespace, cfg):
    """A default BEST_METRIC the eval tasks do not report becomes the first metric they do, and the BEST_METRIC
    macro is rebound so config.gin records the choice. One the user set is left for validation to judge."""
    if cfg.best_metric is None or _best_metric_is_explicit(args):
        return cfg
    try:
        if validation.best_metric_reported(cfg):
            return cfg
        chosen = validation.default_best_metric(cfg)
    except (ValueError, KeyError, TypeError, AssertionError):  # bad task names: validation names them
        return cfg
    validation.warn_once(f"BEST_METRIC={cfg.best_metric!r} is not reported by the eval tasks of "
                         f"{cfg.eval_mixture_or_task_name!r}; using {chosen!r} (set --gin.BEST_METRIC to choose)")
    with gin.unlock_config():
        gin.bind_parameter("BEST_METRIC/gin.macro.value", chosen)
    cfg = train_config()  # called again so gin's operative config (the final config.gin) holds the new value
    return cfg if cfg.best_metric == chosen else dataclasses.replace(cfg, best_metric=chosen)


def load_config(argv):
    """(flags, validated TrainConfig) from gin flags, for entry points outside train/ (eval-suite)."""
    return _configured(argv)


def _one_line(e: Exception) -> str:
    """First line of the error plus gin's note of which configurable it came from (it names the key's owner)."""
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()] or [repr(e)]
    where = next((l for l in lines[1:] if l.startswith("In call to configurable")), "")
    return lines[0] + (f" ({where.rstrip(':')})" if where else "")


def save_vocabulary(cfg) -> Optional[str]:
    """Writes the training vocabulary into MODEL_DIR: a SentencePiece model as vocabulary.model (the run directory
    alone is then enough to decode, evaluate or export the model, whatever cache it was built in); any other
    vocabulary as vocabulary.json describing it (kind, size, HF tokenizer path). Returns the path written."""
    vocab = console.targets_vocabulary(cfg)
    if isinstance(vocab, seqio.SentencePieceVocabulary):
        path = epath.Path(cfg.model_dir) / "vocabulary.model"  # epath: gs:// model dirs too
        path.write_bytes(vocab.sp_model)
        return str(path)
    path = epath.Path(cfg.model_dir) / "vocabulary.json"
    path.write_text(json.dumps(describe_vocabulary(vocab), indent=1) + "\n")
    return str(path)


def describe_vocabulary(vocab) -> dict:
    """Kind and size of a vocabulary, plus what re-creates it (the tokenizer file of an HF vocabulary)."""
    info = {"type": type(vocab).__name__, "module": type(vocab).__module__, "vocab_size": int(vocab.vocab_size),
            "eos_id": vocab.eos_id, "unk_id": vocab.unk_id}
    for attr in ("path", "extra_ids", "start_token", "eos_token"):
        value = getattr(vocab, attr, None)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            info[attr] = value
    return info


def train_main(argv: Sequence[str]) -> dict:
    """Trains as configured. MODEL_DIR is held by this run alone (writer.lock), and a resume is checked against the
    stored structure (run_config.json) before config.gin or anything else is written; see train/run_guard.py.
    SIGTERM/SIGINT save and exit 128 + the signal (train/trainer.py: Interrupted)."""
    return train_configured(_configured(argv)[1])


def train_configured(cfg) -> dict:
    """train_main for a TrainConfig already built from the flags (gin configured, distributed initialized)."""
    cfg = _with_best_mode(cfg)
    try:
        with run_guard.WriterLock(cfg.model_dir):
            record = run_guard.check_structure(cfg.model_dir, cfg)
            if run_guard.is_lead():
                _write_config_gin(cfg.model_dir, gin.config_str())
                run_guard.write_run_config(cfg.model_dir, record)
            save_vocabulary(cfg)
            results = loop.run(cfg, feature_converter=make_feature_converter())
            if run_guard.is_lead():
                epath.Path(cfg.model_dir, "config.gin").write_text(gin.operative_config_str())
    except run_guard.RunDirError as e:
        raise SystemExit(f"flan-jax train: {e}") from None
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
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"flan-jax {name}: {e.strerror} writing {e.filename or 'MODEL_DIR'}; free space (or move MODEL_DIR) and "
              "rerun the same command: it resumes from the newest complete checkpoint", file=sys.stderr)
        return 1
    if name == "eval":
        for task, values in results.items():
            print(task + "\t" + "\t".join(f"{k}={v:.4f}" for k, v in sorted(values.items())))
    return 0


def train_with_console(argv: Sequence[str]) -> dict:
    """train_main between a start banner and an end summary (flags parsed once: jax.distributed may be initialized
    only once per process); a config error surfaces before any banner."""
    _, cfg = _configured(argv)
    if jax.process_index() == 0:
        print(console.start_banner(cfg), flush=True)
    results = train_configured(cfg)
    if jax.process_index() == 0:
        print(console.end_summary(cfg, results or {}), flush=True)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    return _cli(train_with_console, "train", argv)


def eval_cli(argv: Optional[Sequence[str]] = None) -> int:
    return _cli(eval_main, "eval", argv)


def run_eval(cfg: loop.TrainConfig, checkpoint: str, predictions_dir: str = None) -> dict:
    if not cfg.eval_mixture_or_task_name:
        raise ValueError("EVAL_MIXTURE_OR_TASK_NAME is not set in the gin config")
    if predictions_dir:   # a bad folder fails here, not after the whole evaluation
        try:
            predictions.check_writable(predictions_dir, "--predictions_dir")
        except ValueError as e:
            raise ConfigError(str(e)) from None
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


def _with_best_mode(cfg):
    """cfg with the BEST_MODE gin macro ('min' or 'max'), when a gin file or flag defines it."""
    try:
        mode = gin.query_parameter("%BEST_MODE")
    except ValueError:
        return cfg
    if mode not in (None, "min", "max"):
        raise ConfigError(f"BEST_MODE={mode!r}: use 'min' or 'max' (unset: inferred from BEST_METRIC)")
    return dataclasses.replace(cfg, best_mode=mode)


def _write_config_gin(model_dir: str, text: str) -> None:
    """Writes config.gin; a different earlier one is kept as config.<step>.gin (the step its run reached)."""
    path = epath.Path(model_dir) / "config.gin"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text() != text:
        steps = [int(m.group(1)) for p in path.parent.iterdir() if (m := re.fullmatch(r"checkpoint_(\d+)", p.name))]
        stem, n = f"config.{max(steps, default=0)}", 0
        kept = path.parent / f"{stem}.gin"
        while kept.exists():
            n += 1
            kept = path.parent / f"{stem}.{n}.gin"
        path.rename(kept)
    path.write_text(text)
