"""A run directory that defends itself: SIGTERM saves and resumes bitwise, a corrupt newest checkpoint is skipped,
best-checkpoint modes, plain-data input positions, torn metrics lines, one writer, structural config checks.

Signals and lock holders are real processes; the reference run trains in this process (one interpreter start-up).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flan_jax.cli import train as train_cli
from flan_jax.train import checkpointing, loop, optim, partitioning, run_guard
from flan_jax.train import metrics_log
from scripts import chaos

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)


def argv(model_dir, steps=STEPS, *extra):
    # No periodic checkpoint: the interrupted run's only mid-run checkpoint is the one SIGTERM saves.
    return chaos.train_argv(model_dir, steps, 1000) + list(extra)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("reference"))
    train_cli.train_main(argv(d))
    return d


def _wait_for_step(model_dir, step, proc, timeout=300):
    path, deadline = os.path.join(model_dir, "metrics.jsonl"), time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and any(r["metric"] == "loss" and r["step"] >= step
                                        for r in metrics_log.read_metrics(model_dir)):
            return
        time.sleep(0.02)
    raise AssertionError(f"run did not reach step {step}")


@pytest.fixture(scope="module")
def interrupted_dir(tmp_path_factory):
    """A run sent SIGTERM at step >= 3 (its process and output), before any resume."""
    d = str(tmp_path_factory.mktemp("interrupted"))
    proc = subprocess.Popen([sys.executable, "-m", "flan_jax.train", *argv(d)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(d, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    return d, proc.returncode, out


def _final_state(model_dir, step):
    _, cfg = train_cli.load_config(argv(model_dir))
    optimizer = optim.make_adafactor(cfg.adafactor, optim.make_schedule(cfg.schedule))
    abstract, _ = loop.abstract_train_state(cfg.model, optimizer, cfg.mesh, partitioning.make_mesh(cfg.mesh))
    ckpt = checkpointing.Checkpointer(model_dir, keep=None, async_save=False)
    try:
        return jax.device_get(ckpt.restore(abstract, step=step)[0])
    finally:
        ckpt.close()


def _assert_same_run(reference_dir, model_dir):
    ref_losses, _ = chaos.read_train_losses(reference_dir)
    losses, torn = chaos.read_train_losses(model_dir)
    assert sorted(losses) == list(range(1, STEPS + 1)) and torn == 0
    assert losses == ref_losses  # bitwise: floats compared exactly
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), _final_state(model_dir, STEPS),
                        _final_state(reference_dir, STEPS))
    assert all(jax.tree.leaves(same))


def test_sigterm_saves_and_resume_is_bitwise(reference_dir, interrupted_dir):
    d, rc, out = interrupted_dir
    steps = chaos.checkpoint_steps(d)
    assert rc == 128 + signal.SIGTERM, out
    assert len(steps) == 1 and 3 <= steps[0] < STEPS, (steps, out)
    assert f"interrupted at step {steps[0]}, saved checkpoint_{steps[0]}; rerun the same command to resume" in out
    assert "Traceback" not in out
    state_file = os.path.join(d, "input_state", f"checkpoint_{steps[0]}", "process_0.json")
    assert json.load(open(state_file))["version"] == checkpointing.INPUT_STATE_VERSION
    assert not os.path.exists(os.path.join(d, run_guard.LOCK_FILE))  # released on the way out
    train_cli.train_main(argv(d))
    _assert_same_run(reference_dir, d)


def test_corrupt_newest_checkpoint_falls_back_and_is_kept(reference_dir, interrupted_dir, caplog):
    d = interrupted_dir[0]  # resumed to STEPS by the test above: checkpoint_<N> and checkpoint_<STEPS>
    first = chaos.checkpoint_steps(d)[0]
    for root, _, files in os.walk(os.path.join(d, f"checkpoint_{STEPS}")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    train_cli.train_main(argv(d))
    assert f"skipped {d}/checkpoint_{STEPS}" in caplog.text
    assert os.path.isdir(os.path.join(d, checkpointing.UNREADABLE_DIR, f"checkpoint_{STEPS}"))  # kept
    assert chaos.checkpoint_steps(d) == [first, STEPS]
    _assert_same_run(reference_dir, d)


def test_finished_run_does_nothing_and_config_drift(reference_dir, capsys):
    rows = len(metrics_log.read_metrics(reference_dir))
    # A hyperparameter change is allowed (and the earlier config.gin kept) ...
    train_cli.train_main(argv(reference_dir, STEPS, "--gin.LOG_PERIOD=5"))
    assert f"already trained to step {STEPS}" in capsys.readouterr().out
    assert len(metrics_log.read_metrics(reference_dir)) == rows
    assert os.path.exists(os.path.join(reference_dir, f"config.{STEPS}.gin"))
    # ... a structural one stops before anything is written, naming the key and both values.
    before = {n: open(os.path.join(reference_dir, n), "rb").read() for n in ("config.gin", "run_config.json")}
    with pytest.raises(SystemExit) as e:
        train_cli.train_main(argv(reference_dir, STEPS, "--gin.T5Config.emb_dim=32"))
    assert "model.emb_dim: 64 -> 32" in str(e.value.code)
    assert before == {n: open(os.path.join(reference_dir, n), "rb").read() for n in before}


def test_second_signal_exits_at_once(tmp_path):
    code = ("import time; from flan_jax.train.trainer import StopSignals\n"
            "with StopSignals() as s:\n    print('ready', flush=True)\n    time.sleep(60)\nprint('finished')")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # the first signal only asks the loop to stop
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 128 + signal.SIGINT and "finished" not in proc.stdout.read()


def test_one_writer_and_stale_lock(tmp_path, caplog):
    d = str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from flan_jax.train import run_guard\n"
                               f"run_guard.WriterLock({d!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(run_guard.RunDirError, match=f"pid {holder.pid} on"):
        run_guard.WriterLock(d).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_guard.WriterLock(d):  # the dead holder's lock is taken over
        assert json.load(open(os.path.join(d, run_guard.LOCK_FILE)))["pid"] == os.getpid()
    assert f"pid {holder.pid} on this host" in caplog.text
    assert not os.path.exists(os.path.join(d, run_guard.LOCK_FILE))


def test_best_mode_and_retention(tmp_path):
    assert checkpointing.infer_best_mode("mean_seen/loss") == "min"
    assert checkpointing.infer_best_mode("mean_seen/calibrated_ece") == "min"
    assert checkpointing.infer_best_mode("mean_seen/accuracy") == "max"
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1, async_save=False, best_metric="all/loss")
    state = {"w": np.zeros(3, np.float32)}
    for step, loss in [(1, 3.0), (2, 2.0), (3, 4.0)]:
        state = {"w": np.full(3, step, np.float32)}
        ckpt.save(step, state, {"step": step})
        ckpt.maybe_save_best(step, state, {"step": step}, {"all/loss": loss})
    ckpt.close()
    record = json.load(open(tmp_path / "best.json"))
    assert {k: record[k] for k in ("metric", "mode", "step", "value")} == {
        "metric": "all/loss", "mode": "min", "step": 2, "value": 2.0}
    assert os.path.isdir(record["path"]) and chaos.checkpoint_steps(str(tmp_path)) == [3]
    forced = checkpointing.Checkpointer(str(tmp_path / "m"), async_save=False, best_metric="x/loss", best_mode="max")
    assert forced.best_mode == "max"


def test_input_state_is_versioned_json(tmp_path):
    d = str(tmp_path)
    state = {"rng": (3, tuple(range(5)), None), "rows": [(np.arange(4, dtype=np.int32), np.ones(2))],
             "streams": {0: {"buffer": [], "files": {"iterator.index": b"\x00\x01"}}}, "n": np.int64(7)}
    checkpointing.save_input_state(d, 5, {"mixture": "m"}, state)
    back = checkpointing.load_input_state(d, 5, {"mixture": "m"})
    assert back["rng"] == state["rng"] and back["streams"][0]["files"] == {"iterator.index": b"\x00\x01"}
    assert back["rows"][0][0].dtype == np.int32 and np.array_equal(back["rows"][0][1], np.ones(2))
    assert back["n"] == 7 and back["n"].dtype == np.int64
    path = tmp_path / "input_state" / "checkpoint_5" / "process_0.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps(dict(saved, version=99)))
    with pytest.raises(checkpointing.InputStateError, match="format version 99"):
        checkpointing.load_input_state(d, 5, {"mixture": "m"})
    path.write_text(path.read_text()[:40])
    with pytest.raises(checkpointing.InputStateError, match="corrupt"):
        checkpointing.load_input_state(d, 5, {"mixture": "m"})
    path.unlink()
    (path.parent / "process_0.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(checkpointing.InputStateError, match="pickle"):
        checkpointing.load_input_state(d, 5, {"mixture": "m"})


def test_torn_metrics_lines(tmp_path):
    rows = [{"step": s, "split": "train", "task": "all", "metric": "loss", "value": 1.0 / s} for s in (1, 2, 3)]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"step": 4, "split": "tr')  # a killed writer
    assert metrics_log.read_metrics(str(tmp_path)) == rows
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import plot_metrics
    assert len(plot_metrics.load(str(tmp_path))) == 3
    assert metrics_log.truncate_metrics(str(tmp_path), 2) == 2  # step 3 and the torn line
    assert metrics_log.read_metrics(str(tmp_path)) == rows[:2]
    assert open(tmp_path / "metrics.jsonl").read().endswith("\n")


def test_native_position_resumes_bitwise_through_json():
    """The native pipeline's state() saved as the trainer saves it (JSON, no pickle) continues the stream exactly."""
    import flan_jax.tasks  # noqa: F401  (registers flan_default_train)
    from flan_jax import packing
    from flan_jax.pipeline import native
    lengths = {"inputs": 256, "targets": 64}
    make = lambda state=None: native.packed_batches("flan_default_train", lengths, 4,
                                                    packing.PackedEncDecFeatureConverter(), seed=1, state=state)
    reference = make()
    expected = [next(reference) for _ in range(8)]
    first = make()
    for _ in range(5):
        next(first)
    text = json.dumps(checkpointing.to_plain(first.state()))
    resumed = make(checkpointing.from_plain(json.loads(text)))
    for want in expected[5:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_a_full_disk_is_one_line_not_a_traceback(capsys):
    """What `flan-jax train` prints when a write fails for space (scripts/chaos_faults.py disk_full fills a real
    tmpfs): the failing file and the way on, exit 1; other OS errors are not hidden."""
    import errno

    def full(_argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/run/x/input_state/tmp.json")
    assert train_cli._cli(full, "train", []) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device writing /run/x/input_state/tmp.json" in err
    assert "rerun the same command" in err

    def denied(_argv):
        raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(PermissionError):
        train_cli._cli(denied, "train", [])


def test_the_lock_heartbeat_is_renewed_and_a_silent_one_taken_over(tmp_path, caplog):
    """A lock from another host cannot be checked by pid: one renewed recently is refused, one whose heartbeat is older
    than stale_after_s is taken over with a warning. The holder renews its heartbeat while it runs."""
    d, path = str(tmp_path), os.path.join(str(tmp_path), run_guard.LOCK_FILE)
    old = "2026-01-01T00:00:00+00:00"
    with open(path, "w") as f:
        json.dump({"host": "tpu-worker-7", "pid": 4242, "started": old, "heartbeat": run_guard._now()}, f)
    with pytest.raises(run_guard.RunDirError, match="pid 4242 on tpu-worker-7"):
        run_guard.WriterLock(d).acquire()
    with open(path, "w") as f:
        json.dump({"host": "tpu-worker-7", "pid": 4242, "started": old, "heartbeat": old}, f)
    lock = run_guard.WriterLock(d, heartbeat_s=0.05, stale_after_s=600)
    with lock:
        assert "pid 4242 on tpu-worker-7 has not renewed it for" in caplog.text
        first = json.load(open(path))
        assert first["pid"] == os.getpid()
        time.sleep(1.2)   # heartbeats carry whole seconds
        assert json.load(open(path))["heartbeat"] > first["heartbeat"]
    assert not os.path.exists(path)
