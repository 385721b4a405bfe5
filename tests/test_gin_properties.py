"""Random gin overrides on tiny_test.gin: every invalid value is caught before any work, as a ConfigError naming its key.

`flan_jax.cli.train._configured(argv)` parses gin and runs loop.validate_config without training. An oracle written
from the meaning of each setting decides which keys of the merged configuration are invalid; then either
  - some key is invalid  -> ConfigError whose one-line message names one of the invalid keys, or
  - all keys are valid   -> a TrainConfig carrying exactly the overridden values.
KNOWN_GAPS lists values an earlier trainer let through (or rejected without naming the key); each is checked with the
same oracle so none can come back.
"""
import math
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from flan_jax.cli import train as train_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "gin_configs", "runs", "tiny_test.gin")
SCRATCH = tempfile.mkdtemp(prefix="gin_props_")
NOT_A_DIR = os.path.join(SCRATCH, "a_file")
open(NOT_A_DIR, "w").close()

# What tiny_test.gin (with finetune.gin and the tiny model) sets, as the oracle sees it.
DEFAULTS = {
    "TRAIN_STEPS": 12, "BATCH_SIZE": 8, "LEARNING_RATE": 1e-3, "EVAL_PERIOD": 6, "CHECKPOINT_PERIOD": 6,
    "LOG_PERIOD": 2, "NUM_PARTITIONS": 1, "NUM_MICROBATCHES": 1, "SEED": 0, "DROPOUT_RATE": 0.0,
    "ACTIVATION_DTYPE": "float32", "TASK_FEATURE_LENGTHS": {"inputs": 128, "targets": 32},
    "MIXTURE_OR_TASK_NAME": "flan_default_train", "EVAL_MIXTURE_OR_TASK_NAME": "flan_default_eval",
    "BEST_METRIC": "mean_seen/accuracy", "EVAL_EXAMPLES_PER_TASK": 8, "train.mesh_shape": None,
    "train.fsdp": False, "train.keep_checkpoints": 3, "train.warmup_steps": 0, "train.schedule": "constant",
    "train.z_loss": 1e-4, "train.label_smoothing": 0.0, "train.eval_batch_size": 32,
    "T5Config.num_heads": 2, "T5Config.mlp_dim": 128,
}
UNKNOWN_NAMES = {"TRAIN_STEP": "TRAIN_STEP", "train.learning_rat": "learning_rat",
                 "T5Config.num_head": "num_head", "nosuch.param": "nosuch", "BATCHSIZE": "BATCHSIZE"}


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _lengths_ok(v):
    return (isinstance(v, dict) and all(_is_int(v.get(k)) and v[k] > 0 for k in ("inputs", "targets")))


def invalid_keys(cfg: dict) -> set:
    """Keys whose value in the merged configuration is invalid (one device, as in these tests)."""
    bad = set()
    positive_ints = ("TRAIN_STEPS", "BATCH_SIZE", "LOG_PERIOD", "NUM_MICROBATCHES", "EVAL_EXAMPLES_PER_TASK",
                     "train.eval_batch_size", "train.keep_checkpoints", "T5Config.num_heads", "T5Config.mlp_dim")
    for key in positive_ints:
        if not (_is_int(cfg[key]) and cfg[key] > 0):
            bad.add(key)
    for key in ("EVAL_PERIOD", "CHECKPOINT_PERIOD", "train.warmup_steps"):
        if not (_is_int(cfg[key]) and cfg[key] >= 0):
            bad.add(key)
    # An explicit train.mesh_shape overrides NUM_PARTITIONS, which then only has to be a positive int.
    fits = cfg["NUM_PARTITIONS"] == 1 or cfg["train.mesh_shape"] is not None
    if not (_is_int(cfg["NUM_PARTITIONS"]) and cfg["NUM_PARTITIONS"] > 0 and fits):
        bad.add("NUM_PARTITIONS")
    if "NUM_MICROBATCHES" not in bad and "BATCH_SIZE" not in bad and cfg["BATCH_SIZE"] % cfg["NUM_MICROBATCHES"]:
        bad.add("NUM_MICROBATCHES")
    if not (_is_int(cfg["SEED"]) and 0 <= cfg["SEED"] < 2 ** 32):
        bad.add("SEED")
    if not (_is_number(cfg["LEARNING_RATE"]) and cfg["LEARNING_RATE"] > 0):
        bad.add("LEARNING_RATE")
    if not (_is_number(cfg["DROPOUT_RATE"]) and 0 <= cfg["DROPOUT_RATE"] < 1):
        bad.add("DROPOUT_RATE")
    if not (_is_number(cfg["train.label_smoothing"]) and 0 <= cfg["train.label_smoothing"] < 1):
        bad.add("train.label_smoothing")
    if not (_is_number(cfg["train.z_loss"]) and cfg["train.z_loss"] >= 0):
        bad.add("train.z_loss")
    if cfg["ACTIVATION_DTYPE"] not in ("float32", "bfloat16", "float16"):
        bad.add("ACTIVATION_DTYPE")
    if not _lengths_ok(cfg["TASK_FEATURE_LENGTHS"]):
        bad.add("TASK_FEATURE_LENGTHS")
    if cfg["MIXTURE_OR_TASK_NAME"] not in ("flan_default_train", "flan_default_eval"):
        bad.add("MIXTURE_OR_TASK_NAME")
    if cfg["EVAL_MIXTURE_OR_TASK_NAME"] not in (None, "flan_default_eval"):
        bad.add("EVAL_MIXTURE_OR_TASK_NAME")
    # Trained on flan_default_eval, every eval task is seen: there is no mean_heldout group to select.
    heldout = ("mean_heldout/accuracy",) if cfg["MIXTURE_OR_TASK_NAME"] != "flan_default_eval" else ()
    if cfg["BEST_METRIC"] not in (None, "mean_seen/accuracy", "mean_seen/exact_match") + heldout:
        bad.add("BEST_METRIC")
    if cfg["train.mesh_shape"] not in (None, (1, 1), [1, 1]):
        bad.add("train.mesh_shape")
    if not isinstance(cfg["train.fsdp"], bool):
        bad.add("train.fsdp")
    if cfg["train.schedule"] not in ("constant", "warmup_constant", "rsqrt"):
        bad.add("train.schedule")
    if "MODEL_DIR" in cfg and cfg["MODEL_DIR"].startswith(NOT_A_DIR):
        bad.add("MODEL_DIR")
    bad.update(k for k in cfg if k in UNKNOWN_NAMES)
    return bad


def needles(key: str) -> tuple:
    """Strings any of which names `key` in an error message."""
    if key in UNKNOWN_NAMES:
        return (UNKNOWN_NAMES[key],)
    short = key.split(".")[-1]
    aliases = {"ACTIVATION_DTYPE": ("T5Config.dtype",), "DROPOUT_RATE": ("dropout_rate",),
               "train.mesh_shape": ("MESH_SHAPE",), "NUM_MICROBATCHES": ("BATCH_SIZE",),
               "BATCH_SIZE": ("NUM_MICROBATCHES",)}
    return (key, short, short.upper()) + aliases.get(key, ())


def gin_literal(value) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "1e999" if value > 0 else "-1e999"
    return repr(value)


def configure(overrides: dict):
    model_dir = overrides.get("MODEL_DIR", os.path.join(SCRATCH, "run"))
    argv = [f"--gin_file={TINY}", f"--gin.MODEL_DIR={model_dir}"]
    argv += [f"--gin.{k}={gin_literal(v)}" for k, v in overrides.items() if k != "MODEL_DIR"]
    return train_main._configured(argv)[1]


def check_overrides(overrides: dict) -> None:
    merged = {**DEFAULTS, **overrides}
    bad = invalid_keys(merged)
    if bad:
        with pytest.raises(train_main.ConfigError) as info:
            configure(overrides)
        message = str(info.value)
        assert "\n" not in message
        assert any(n in message for key in bad for n in needles(key)), (overrides, sorted(bad), message)
        return
    cfg = configure(overrides)  # must not raise
    assert cfg.train_steps == merged["TRAIN_STEPS"] and cfg.input.global_batch_size == merged["BATCH_SIZE"]
    assert cfg.schedule.learning_rate == merged["LEARNING_RATE"] and cfg.seed == merged["SEED"]
    assert dict(cfg.input.task_feature_lengths) == merged["TASK_FEATURE_LENGTHS"]
    assert (cfg.eval_period, cfg.checkpoint_period, cfg.log_period) == (
        merged["EVAL_PERIOD"], merged["CHECKPOINT_PERIOD"], merged["LOG_PERIOD"])
    assert cfg.num_microbatches == merged["NUM_MICROBATCHES"] and cfg.model.dropout_rate == merged["DROPOUT_RATE"]
    assert cfg.model.num_heads == merged["T5Config.num_heads"] and cfg.best_metric == merged["BEST_METRIC"]


# --------------------------------------------------------------------------------------------------------------------
# Generated overrides (values the trainer is expected to judge correctly today)
# --------------------------------------------------------------------------------------------------------------------
_not_numbers = st.sampled_from([None, [1], (2,), {"a": 1}])
_ints = st.one_of(st.integers(-3, 40), st.sampled_from([True, False, None, 1.5, "8", [8]]))
VALUES = {
    "TRAIN_STEPS": _ints, "BATCH_SIZE": _ints, "LOG_PERIOD": _ints, "EVAL_PERIOD": _ints,
    "CHECKPOINT_PERIOD": _ints, "NUM_PARTITIONS": _ints,
    "NUM_MICROBATCHES": st.one_of(st.integers(-1, 9)),
    "SEED": st.one_of(st.integers(0, 2 ** 31 - 1)),
    "LEARNING_RATE": st.one_of(st.floats(-1.0, 1.0, allow_nan=False), st.sampled_from([-1e999, 0, 2, True, None])),
    "DROPOUT_RATE": st.one_of(st.floats(-1.0, 2.0, allow_nan=False), st.sampled_from([-1e999, 1e999])),
    "ACTIVATION_DTYPE": st.sampled_from(["float32", "bfloat16", "float16", "float33", "int8", ""]),
    "TASK_FEATURE_LENGTHS": st.one_of(
        st.fixed_dictionaries({"inputs": st.integers(-2, 300), "targets": st.integers(-2, 80)}),
        st.sampled_from([{"inputs": 128}, {}, {"targets": 32}, [128, 32], None])),
    "MIXTURE_OR_TASK_NAME": st.sampled_from(["flan_default_train", "flan_default_eval", "no_such_mixture", 5, None]),
    "EVAL_MIXTURE_OR_TASK_NAME": st.sampled_from([None, "flan_default_eval"]),
    "BEST_METRIC": st.sampled_from([None, "mean_seen/accuracy", "mean_heldout/accuracy", "accuracy", ""]),
    "train.mesh_shape": st.sampled_from([None, (1, 1), [1, 1], (2, 1), (1, 2), (1,), (1, 1, 1)]),
    "train.schedule": st.sampled_from(["constant", "warmup_constant", "rsqrt"]),
    "train.warmup_steps": st.integers(0, 100),
    "train.keep_checkpoints": st.integers(1, 5),
    "T5Config.num_heads": st.integers(-1, 4),
    "T5Config.mlp_dim": st.integers(-1, 256),
    "MODEL_DIR": st.sampled_from([os.path.join(SCRATCH, "other"), os.path.join(SCRATCH, "x", "y")]),
    **{name: st.integers(1, 5) for name in UNKNOWN_NAMES},
}


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.dictionaries(st.sampled_from(sorted(VALUES)), st.none(), min_size=1, max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: VALUES[k] for k in keys})))
def test_random_overrides_never_reach_training_invalid(overrides):
    check_overrides(overrides)


def test_oracle_is_not_vacuous():
    """Sanity of the oracle itself: the defaults are valid, and each kind of mistake is seen as one."""
    assert invalid_keys(DEFAULTS) == set()
    assert invalid_keys({**DEFAULTS, "BATCH_SIZE": 9, "NUM_MICROBATCHES": 2}) == {"NUM_MICROBATCHES"}
    assert invalid_keys({**DEFAULTS, "LEARNING_RATE": float("inf")}) == {"LEARNING_RATE"}
    check_overrides({})
    check_overrides({"TRAIN_STEPS": 0})
    check_overrides({"BATCH_SIZE": 6, "NUM_MICROBATCHES": 3, "TRAIN_STEPS": 3})


# --------------------------------------------------------------------------------------------------------------------
# Known gaps: invalid values that get past _configured today, or are rejected without naming the key
# --------------------------------------------------------------------------------------------------------------------
KNOWN_GAPS = [
    ({"LEARNING_RATE": float("inf")}, "accepted: validate_config checks > 0 but not finiteness"),
    ({"DROPOUT_RATE": "x"}, "TypeError from the comparison; message does not name DROPOUT_RATE"),
    ({"T5Config.num_heads": "x"}, "TypeError from the comparison; message does not name num_heads"),
    ({"T5Config.num_heads": 2.5}, "accepted: T5Config checks > 0 but not int"),
    ({"train.schedule": "cosine"}, "accepted: only make_schedule (inside loop.run) rejects it"),
    ({"SEED": "abc"}, "accepted: seed is not type-checked"),
    ({"SEED": 1.5}, "accepted: seed is not type-checked"),
    ({"TASK_FEATURE_LENGTHS": {"inputs": "a", "targets": 3}}, "TypeError; message does not name the key"),
    ({"TASK_FEATURE_LENGTHS": {"inputs": 1.5, "targets": 32}}, "accepted: lengths are not type-checked"),
    ({"NUM_MICROBATCHES": "2"}, "TypeError; message does not name NUM_MICROBATCHES"),
    ({"MODEL_DIR": os.path.join(NOT_A_DIR, "sub")}, "OSError names the path but not MODEL_DIR"),
    ({"train.keep_checkpoints": 0}, "accepted"),
    ({"train.z_loss": -1.0}, "accepted"),
    ({"train.loss_normalizing_factor": "foo"}, "accepted: rejected only while tracing the train step"),
    ({"BEST_METRIC": "mean_seen/no_such_metric"}, "a metric the eval tasks do not report"),
    ({"train.warmup_steps": -3}, "accepted (silently treated as 0)"),
    ({"train.label_smoothing": 1.5}, "accepted: log of a negative confidence gives NaN losses"),
    ({"EVAL_EXAMPLES_PER_TASK": 0}, "accepted"),
    ({"train.eval_batch_size": 0}, "accepted"),
    ({"train.fsdp": "yes"}, "accepted: any truthy value"),
    ({"EVAL_MIXTURE_OR_TASK_NAME": "no_such_eval"}, "error says MIXTURE_OR_TASK_NAME='no_such_eval' (wrong key)"),
    ({"MIXTURE_OR_TASK_NAME": "flan_default_eval", "BEST_METRIC": "mean_heldout/accuracy"},
     "refused: trained on every eval task, there is no held-out group to select"),
]


def _extra_oracle(overrides):
    """Keys that invalid_keys() does not model but the gaps above need."""
    extra = set()
    if "train.loss_normalizing_factor" in overrides:
        v = overrides["train.loss_normalizing_factor"]
        if not (v in (None, "none", "num_real_target_tokens", "average_per_sequence") or (_is_number(v) and v > 0)):
            extra.add("train.loss_normalizing_factor")
    return extra


@pytest.mark.parametrize("overrides, note", KNOWN_GAPS,
                         ids=[f"{i}-{sorted(o)[0]}" for i, (o, _) in enumerate(KNOWN_GAPS)])
def test_former_gap_is_caught(overrides, note):
    merged = {**DEFAULTS, **overrides}
    bad = invalid_keys(merged) | _extra_oracle(overrides)
    assert bad, f"oracle sees no invalid key in {overrides}"
    with pytest.raises(train_main.ConfigError) as info:
        configure(overrides)
    assert any(n in str(info.value) for key in bad for n in needles(key)), str(info.value)
