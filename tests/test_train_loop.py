"""End-to-end trainer behaviour on tiny_test.gin: metrics contract, exact resume, config errors, non-finite loss."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flan_jax.cli import train as train_main_lib
from flan_jax.train.metrics_log import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "gin_configs", "runs", "tiny_test.gin")


def _train(model_dir, *extra):
    return train_main_lib.train_main([f"--gin_file={TINY}", f"--gin.MODEL_DIR={model_dir}", *extra])


def _train_losses(model_dir):
    return {r["step"]: r["value"] for r in read_metrics(model_dir) if r["split"] == "train" and r["metric"] == "loss"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("full"))
    results = _train(d, "--gin.LOG_PERIOD=1")
    return d, results


def test_metrics_contract_and_outputs(full_run):
    d, results = full_run
    rows = read_metrics(d)
    assert all(set(r) == {"step", "split", "task", "metric", "value"} for r in rows)
    train = [r for r in rows if r["split"] == "train"]
    assert {"loss", "steps_per_sec", "tokens_per_sec", "encoder_nonpadding_fraction",
            "decoder_nonpadding_fraction", "segments_per_row", "mfu", "learning_rate"} <= {r["metric"] for r in train}
    assert sorted({r["step"] for r in train}) == list(range(1, 13))
    evals = [r for r in rows if r["split"] == "eval"]
    assert {r["step"] for r in evals} == {6, 12}
    tasks_seen = {r["task"] for r in evals}
    assert {"mean_seen", "mean_heldout"} <= tasks_seen
    assert any(r["metric"] == "accuracy" for r in evals) and any(r["metric"] == "exact_match" for r in evals)
    logged = {(r["task"], r["metric"]): r["value"] for r in evals if r["step"] == 12}
    assert results["mean_seen"] == {m: v for (t, m), v in logged.items() if t == "mean_seen"}  # returned = logged
    assert os.path.isdir(os.path.join(d, "checkpoint_12")) and os.path.isdir(os.path.join(d, "checkpoint_6"))
    assert os.path.exists(os.path.join(d, "config.gin")) and os.path.isdir(os.path.join(d, "tb"))
    # The run directory carries its vocabulary: the default collection's BPE model, copied from the cache.
    import seqio
    vocab = seqio.SentencePieceVocabulary(os.path.join(d, "vocabulary.model"))
    assert vocab.decode(vocab.encode("Is 905 even or odd?")) == "Is 905 even or odd?"
    best = json.load(open(os.path.join(d, "best.json")))
    assert best["metric"] == "mean_seen/accuracy" and best["step"] in (6, 12)


def test_throughput_counts_training_steps_only(full_run):
    """Eval and checkpoint time is logged on its own, not folded into steps_per_sec of the window it falls in."""
    d, _ = full_run
    train = [r for r in read_metrics(d) if r["split"] == "train" and r["task"] == "all"]
    by_metric = lambda name: {r["step"]: r["value"] for r in train if r["metric"] == name}
    assert set(by_metric("eval_seconds")) == {6, 12} and set(by_metric("checkpoint_seconds")) == {6, 12}
    assert min(by_metric("eval_seconds").values()) > 0
    sps = by_metric("steps_per_sec")
    typical = sorted(sps[s] for s in range(2, 13))[5]  # step 1 compiles
    # Step 7's window holds step 6's eval and save (tens of seconds, steps/s ~0.03 if counted); a loaded machine may
    # slow one step a few times, hence the wide margin.
    assert sps[7] > typical / 20, (sps, by_metric("eval_seconds"))
    eval_and_save = by_metric("eval_seconds")[6] + by_metric("checkpoint_seconds")[6]
    # Counted in, the window's time would exceed the eval and save; left out, it is a step (well under half of them).
    assert 1 / sps[7] < eval_and_save / 2, (sps[7], eval_and_save)


def test_resume_is_bitwise_identical(full_run, tmp_path):
    d_full, _ = full_run
    d = str(tmp_path / "resumed")
    cfg_args = ("--gin.LOG_PERIOD=1",)
    # First half: stop after step 6 (a checkpoint is written), then run the same command again to step 12.
    from flan_jax.train import loop
    args_cfg = train_main_lib._configured([f"--gin_file={TINY}", f"--gin.MODEL_DIR={d}", *cfg_args])[1]
    loop.run(args_cfg, feature_converter=train_main_lib.make_feature_converter(), stop_after_steps=6)
    assert sorted(_train_losses(d)) == list(range(1, 7))
    _train(d, *cfg_args)
    full, resumed = _train_losses(d_full), _train_losses(d)
    for step in range(1, 13):
        assert resumed[step] == full[step], (step, resumed[step], full[step])


def test_resume_after_sigkill_right_after_checkpoint(full_run, tmp_path):
    d_full, _ = full_run
    d = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "flan_jax.train", f"--gin_file={TINY}", f"--gin.MODEL_DIR={d}",
           "--gin.LOG_PERIOD=1", "--gin.TRAIN_STEPS=100", "--gin.EVAL_PERIOD=0"]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not os.path.isdir(os.path.join(d, "checkpoint_6")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(os.path.join(d, "checkpoint_6")), "the run never wrote checkpoint_6"
    # Resume with the uninterrupted run's settings: losses of the steps after the checkpoint must match exactly.
    _train(d, "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=0")
    full, resumed = _train_losses(d_full), _train_losses(d)
    for step in range(7, 13):
        assert resumed[step] == full[step], (step, resumed[step], full[step])


@pytest.mark.parametrize("flag, needle", [
    ("--gin.train.learning_rat=0.1", "learning_rat"),
    ("--gin.TRAIN_STEP=5", "TRAIN_STEP"),
    ("--gin.MIXTURE_OR_TASK_NAME=no_such_mixture", "no_such_mixture"),
    ("--gin.BATCH_SIZE='eight'", "BATCH_SIZE"),
    ("--gin.NUM_PARTITIONS=3", "NUM_PARTITIONS"),
    ("--gin.T5Config.vocab_size=384", "T5Config.vocab_size=384 is smaller"),
    ("--gin.train.compile_effort=2.0", "train.compile_effort=2.0"),
    ("--gin.MODEL_DIR='gs://bucket/run'", "MODEL_DIR='gs://bucket/run': a URL; mount the bucket"),
])
def test_config_errors_name_the_key_before_training(tmp_path, flag, needle):
    d = str(tmp_path / "bad")
    with pytest.raises(train_main_lib.ConfigError, match=needle):
        _train(d, flag)
    assert not os.path.exists(os.path.join(d, "metrics.jsonl"))


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    from flan_jax.train.loop import NonFiniteLossError
    d = str(tmp_path / "nan")
    # A huge learning rate blows the parameters up to inf within a few steps.
    with pytest.raises(NonFiniteLossError, match=r"not finite at step \d+"):
        _train(d, "--gin.LEARNING_RATE=1e38", "--gin.CHECKPOINT_PERIOD=1", "--gin.EVAL_PERIOD=0",
               "--gin.LOG_PERIOD=1")
    import math
    losses = _train_losses(d)
    bad = min(s for s, v in losses.items() if isinstance(v, str) or not math.isfinite(v))
    kept = sorted(int(n.split("_")[1]) for n in os.listdir(d) if n.startswith("checkpoint_"))
    assert kept and max(kept) < bad


def test_eval_alone_from_a_checkpoint_writes_metrics_and_predictions(full_run, tmp_path):
    d, results = full_run
    out = tmp_path / "preds"
    evaluated = train_main_lib.eval_main([f"--gin_file={TINY}", f"--gin.MODEL_DIR={d}",
                                          f"--checkpoint={d}/checkpoint_12", f"--predictions_dir={out}"])
    # the same params give the same figures as the in-training evaluation at step 12
    for task in ("mean_seen", "mean_heldout"):
        for metric, value in results[task].items():
            assert evaluated[task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
    files = sorted(p.name for p in out.iterdir())
    assert "parity_zs_opt.jsonl" in files
    first = json.loads(open(out / "parity_zs_opt.jsonl").readline())
    assert set(first) == {"index", "input", "target", "prediction"} and first["prediction"] in ("even", "odd")
