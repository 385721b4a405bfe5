"""scripts/chaos.py, small: one run killed while a checkpoint is being written, resumed, compared bitwise.

The reference run trains in this process (saving one interpreter start-up); the chaos run is two subprocesses.
The checks themselves are also shown to fail when they should (a changed loss, a torn checkpoint).
"""
import json
import os
import shutil

import pytest

from scripts import chaos
from flan_jax.cli import train as train_main

STEPS, PERIOD = 6, 2


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("chaos_reference"))
    train_main.train_main(chaos.train_argv(d, STEPS, PERIOD, keep_all=True))
    return d


def test_killed_during_checkpoint_write_resumes_bitwise(reference_dir, tmp_path, capsys):
    summary = chaos.run_chaos(runs=1, steps=STEPS, checkpoint_period=PERIOD, max_kills=1, seed=1,
                              work_dir=str(tmp_path), reference_dir=reference_dir, modes=("during_checkpoint",))
    out = capsys.readouterr().out
    assert "SIGKILL during_checkpoint" in out and ".orbax-checkpoint-tmp" in out, out  # the kill hit a write
    assert summary.line() == "1 runs, 1 resumed, 0 divergent, 0 unreadable checkpoints", summary.details
    assert chaos.checkpoint_steps(str(tmp_path / "run0"))[-1] == STEPS


def test_losses_last_line_wins_and_torn_lines_are_reported(tmp_path):
    rows = [(1, 5.0), (2, 4.0), (2, 3.5), (1, 5.0)]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, loss in rows:
            f.write(json.dumps({"step": step, "split": "train", "task": "all", "metric": "loss", "value": loss}) + "\n")
        f.write(json.dumps({"step": 2, "split": "eval", "task": "all", "metric": "loss", "value": 9.0}) + "\n")
        f.write('{"step": 3, "split": "tr')  # a write cut short by SIGKILL
    assert chaos.read_train_losses(str(tmp_path)) == ({1: 5.0, 2: 3.5}, 1)
    outcome = chaos.RunOutcome("x", str(tmp_path))
    chaos.compare_losses({1: 5.0, 2: 3.5}, outcome, 2)
    assert outcome.problems == ["1 metrics.jsonl lines are not valid JSON (torn write?)"]
    outcome = chaos.RunOutcome("x", str(tmp_path))
    chaos.compare_losses({1: 5.0, 2: 3.25, 3: 1.0}, outcome, 3)
    assert any("first step 2" in p for p in outcome.problems) and any("steps [3]" in p for p in outcome.problems)


def test_torn_and_foreign_checkpoints_are_detected(reference_dir, tmp_path):
    run_dir = str(tmp_path / "run0")
    shutil.copytree(reference_dir, run_dir)
    # A checkpoint whose files were partly removed (e.g. a kill during orbax's deletion of old checkpoints) ...
    torn = os.path.join(run_dir, f"checkpoint_{PERIOD}")
    for root, _, files in os.walk(torn):
        for name in files:
            os.remove(os.path.join(root, name))
    # ... and one that loads but holds other numbers (renamed from another step).
    shutil.rmtree(os.path.join(run_dir, f"checkpoint_{2 * PERIOD}"))
    shutil.copytree(os.path.join(reference_dir, f"checkpoint_{3 * PERIOD}"),
                    os.path.join(run_dir, f"checkpoint_{2 * PERIOD}"))
    outcome = chaos.RunOutcome("run0", run_dir)
    unreadable, messages = chaos.verify_checkpoints(reference_dir, [outcome], STEPS, PERIOD)
    assert unreadable == 2 and any(f"checkpoint_{PERIOD}" in m for m in messages), messages
    assert any(f"checkpoint_{2 * PERIOD}" in m and "holds step" in m for m in messages), messages


def test_fault_drill_two_writers_and_the_report(tmp_path, capsys):
    """scripts/chaos_faults.py with one fault, real processes: the second writer is refused in one line, the first
    finishes bitwise equal to the reference; the report's totals and exit status follow from the fault reports."""
    from scripts import chaos_faults
    assert chaos_faults.main(["--faults", "two_writers", "--steps", "4", "--work_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "two_writers       signals 0, resumes 0, divergent 0, unreadable 0, lost steps 0, tracebacks 0" in out
    bad = chaos_faults.FaultReport("x", tracebacks=1)
    bad.fail("why")
    total = chaos_faults.total([bad, chaos_faults.FaultReport("y", signals=2)])
    assert (total.signals, total.divergent, total.tracebacks) == (2, 1, 1) and "[why]" in bad.line()
