#!/usr/bin/env python
"""Fault drill: what a run directory meets on shared machines and preemptible slices, beyond scripts/chaos.py's
SIGKILLs, each injected into real `python -m flan_jax.train` processes of gin_configs/runs/tiny_test.gin.

  python scripts/chaos_faults.py [--faults sigterm_mid_save,...] [--steps 8] [--checkpoint_period 2] [--work_dir D]

Faults (each in its own MODEL_DIR; every run that reaches the end is compared bitwise with an uninterrupted reference
run of the same input pipeline):
  sigterm_mid_save  SIGTERM while orbax writes a checkpoint: the step finishes, a checkpoint is saved, exit 143; rerun.
  sigterm_native    SIGTERM at a step with the native input pipeline (its position saved as JSON); rerun.
  eval_best         SIGKILL between evaluations with BEST_METRIC set; rerun; best.json must name a kept checkpoint
                    holding the best value of the metric in metrics.jsonl.
  disk_full         MODEL_DIR on a tmpfs too small for the checkpoints: the save fails with one line, no traceback;
                    the directory is moved to a large disk and the same command resumes (needs `mount`; else skipped).
  two_writers       a second process on the same MODEL_DIR while the first trains: refused in one line.
  changed_config    resume with another model shape: refused in one line naming the key; config.gin untouched.
  corrupt_newest    the newest checkpoint's files overwritten: resume falls back to the previous one, keeps the bad one.
  torn_metrics      a half-written metrics.jsonl line: resume and scripts/plot_metrics.py read past it.

Report, per fault and in total: signals sent, resumes, divergent runs (losses or final checkpoint differ from the
reference, or an unexpected exit status or message), unreadable checkpoints, lost steps (steps trained before a
SIGTERM stop that its checkpoint does not hold), user-facing tracebacks. Exit status 1 when any of the last four
is not 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make `scripts` and `flan_jax` importable
    sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from scripts import chaos  # noqa: E402

NATIVE = "--gin.train.input_pipeline='native'"
EVAL = ["--gin.EVAL_PERIOD=2", "--gin.EVAL_MIXTURE_OR_TASK_NAME='flan_default_eval'", "--gin.EVAL_EXAMPLES_PER_TASK=4",
        "--gin.BEST_METRIC='mean_seen/loss'"]
TRACEBACK = "Traceback (most recent call last)"


@dataclasses.dataclass
class FaultReport:
    fault: str
    signals: int = 0
    resumes: int = 0
    divergent: int = 0
    unreadable: int = 0
    lost_steps: int = 0
    tracebacks: int = 0
    notes: list = dataclasses.field(default_factory=list)

    def fail(self, why: str) -> None:
        self.divergent = 1
        self.notes.append(why)

    def line(self) -> str:
        return (f"{self.fault:17s} signals {self.signals}, resumes {self.resumes}, divergent {self.divergent}, "
                f"unreadable {self.unreadable}, lost steps {self.lost_steps}, tracebacks {self.tracebacks}"
                + (f"  [{'; '.join(self.notes)}]" if self.notes else ""))


class Drill:
    """The reference runs and the helpers every fault uses: start, signal, rerun and check a training process."""

    def __init__(self, work_dir: str, steps: int, period: int):
        self.work_dir, self.steps, self.period = work_dir, steps, period
        self.references = {}

    def argv(self, model_dir: str, *extra: str) -> list:
        return chaos.train_argv(model_dir, self.steps, self.period) + list(extra)

    def reference(self, *extra: str) -> str:
        key = " ".join(extra)
        if key not in self.references:
            slug = "".join(c if c.isalnum() else "_" for c in key)[:80].strip("_")
            d = os.path.join(self.work_dir, "reference" + (f"_{slug}" if slug else ""))
            argv = chaos.train_argv(d, self.steps, self.period, keep_all=True) + list(extra)
            if sorted(chaos.read_train_losses(d)[0]) != list(range(1, self.steps + 1)):  # else kept from a last drill
                shutil.rmtree(d, ignore_errors=True)
                if chaos._finish(chaos._start(d, argv, d + ".log")) != 0:
                    raise RuntimeError(f"reference run failed: {d}.log")
            self.references[key] = d
        return self.references[key]

    def run(self, report: FaultReport, model_dir: str, *extra: str) -> tuple[int, str]:
        """One process to its end: (exit status, its output); tracebacks counted."""
        log = os.path.join(self.work_dir, os.path.basename(model_dir) + ".log")
        start = os.path.getsize(log) if os.path.exists(log) else 0
        rc = chaos._finish(chaos._start(model_dir, self.argv(model_dir, *extra), log))
        return rc, self._output(report, log, start)

    def run_until(self, report: FaultReport, model_dir: str, ready, sig: int, *extra: str) -> tuple[int, str]:
        """Starts a process, sends `sig` once ready(model_dir) is true, waits for it: (exit status, output)."""
        log = os.path.join(self.work_dir, os.path.basename(model_dir) + ".log")
        start = os.path.getsize(log) if os.path.exists(log) else 0
        proc = chaos._start(model_dir, self.argv(model_dir, *extra), log)
        deadline = time.time() + chaos.PROCESS_TIMEOUT_S
        while proc.poll() is None and not ready(model_dir) and time.time() < deadline:
            time.sleep(chaos.POLL_S)
        if proc.poll() is None:
            proc.send_signal(sig)
            report.signals += 1
        return chaos._finish(proc), self._output(report, log, start)

    @staticmethod
    def _output(report: FaultReport, log: str, start: int) -> str:
        with open(log, errors="replace") as f:
            f.seek(start)
            out = f.read()
        report.tracebacks += out.count(TRACEBACK)
        return out

    def check_end(self, report: FaultReport, model_dir: str, reference: str) -> None:
        """Losses of every step equal the reference's bitwise; every checkpoint restores and holds its step."""
        losses, torn = chaos.read_train_losses(model_dir)
        want, _ = chaos.read_train_losses(reference)
        if sorted(losses) != list(range(1, self.steps + 1)) or losses != want:
            report.fail(f"losses differ from {os.path.basename(reference)} (torn lines {torn})")
        outcome = chaos.RunOutcome(report.fault, model_dir)
        unreadable, messages = chaos.verify_checkpoints(reference, [outcome], self.steps, self.period)
        report.unreadable += unreadable
        report.notes += messages
        if outcome.problems:
            report.fail("; ".join(outcome.problems))

    def lost_after_sigterm(self, report: FaultReport, model_dir: str, rc: int) -> None:
        if rc != 128 + signal.SIGTERM:
            report.fail(f"exit status {rc} after SIGTERM, expected 143")
            return
        trained = chaos._StepWatcher(model_dir).poll()
        saved = max(chaos.checkpoint_steps(model_dir) or [0])
        report.lost_steps += max(0, trained - saved)


def at_step(step: int):
    return lambda model_dir: chaos._StepWatcher(model_dir).poll() >= step


def saving(model_dir: str) -> bool:
    return bool(chaos._tmp_dirs(model_dir))


def expect_refusal(report: FaultReport, rc: int, out: str, needle: str) -> None:
    lines = [l for l in out.splitlines() if needle in l]
    if rc == 0 or not lines:
        report.fail(f"expected a refusal naming {needle!r} (exit {rc})")


# --- the faults ------------------------------------------------------------------------------------------------------
def sigterm_mid_save(drill: Drill, report: FaultReport, d: str) -> None:
    rc, out = drill.run_until(report, d, saving, signal.SIGTERM)
    drill.lost_after_sigterm(report, d, rc)
    if "rerun the same command to resume" not in out:
        report.fail("no 'rerun the same command' line after SIGTERM")
    report.resumes += 1
    drill.run(report, d)
    drill.check_end(report, d, drill.reference())


def sigterm_native(drill: Drill, report: FaultReport, d: str) -> None:
    rc, _ = drill.run_until(report, d, at_step(drill.steps // 2 + 1), signal.SIGTERM, NATIVE)
    drill.lost_after_sigterm(report, d, rc)
    report.resumes += 1
    drill.run(report, d, NATIVE)
    drill.check_end(report, d, drill.reference(NATIVE))


def eval_best(drill: Drill, report: FaultReport, d: str) -> None:
    drill.run_until(report, d, at_step(drill.steps // 2 + 1), signal.SIGKILL, *EVAL)
    report.resumes += 1
    drill.run(report, d, *EVAL)
    drill.check_end(report, d, drill.reference(*EVAL))
    best_file = os.path.join(d, "best.json")
    if not os.path.exists(best_file):
        return report.fail("no best.json")
    best = json.load(open(best_file))
    values = {r["step"]: r["value"] for r in chaos_rows(d) if r["split"] == "eval" and r["task"] == "mean_seen"
              and r["metric"] == "loss"}
    if not values or best["value"] != min(values.values()) or best.get("mode") != "min":
        report.fail(f"best.json {best} is not the minimum of mean_seen/loss {values}")
    if not os.path.isdir(best["path"] if os.path.isabs(best["path"]) else os.path.join(chaos.REPO, best["path"])):
        report.fail(f"best.json names {best['path']}, which is gone")


def chaos_rows(model_dir: str) -> list:
    rows = []
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def disk_full(drill: Drill, report: FaultReport, d: str) -> None:
    reference = drill.reference()
    one = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(reference, "checkpoint_2"))
              for f in fs)
    os.makedirs(d, exist_ok=True)
    size_kib = max(64, int(1.5 * one / 1024))   # the first checkpoint fits, the second does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", d], capture_output=True).returncode:
        report.notes.append("skipped: cannot mount a tmpfs here")
        return
    try:
        rc, out = drill.run(report, d)
        if rc == 0:
            report.notes.append(f"a {size_kib} KiB disk held the whole run")
        elif not [l for l in out.splitlines() if "No space left" in l or "space" in l.lower()]:
            report.fail(f"exit {rc} without naming the full disk")
        moved = d + "_moved"
        shutil.rmtree(moved, ignore_errors=True)
        shutil.copytree(d, moved, ignore=shutil.ignore_patterns("*.orbax-checkpoint-tmp*"))
    finally:
        subprocess.run(["umount", d], capture_output=True)
    report.resumes += 1
    drill.run(report, moved)
    drill.check_end(report, moved, reference)


def two_writers(drill: Drill, report: FaultReport, d: str) -> None:
    log = os.path.join(drill.work_dir, "two_writers_first.log")
    first = chaos._start(d, drill.argv(d), log)
    while not at_step(1)(d) and first.poll() is None:
        time.sleep(chaos.POLL_S)
    first.send_signal(signal.SIGSTOP)   # paused holding the lock: the second writer meets a live first one
    try:
        rc, out = drill.run(report, d)
    finally:
        first.send_signal(signal.SIGCONT)
    expect_refusal(report, rc, out, "is being written by pid")
    if chaos._finish(first) != 0:
        report.fail("the first writer did not finish")
    drill._output(report, log, 0)
    drill.check_end(report, d, drill.reference())


def changed_config(drill: Drill, report: FaultReport, d: str) -> None:
    rc, _ = drill.run_until(report, d, at_step(3), signal.SIGTERM)
    drill.lost_after_sigterm(report, d, rc)
    before = open(os.path.join(d, "config.gin"), "rb").read()
    rc, out = drill.run(report, d, "--gin.T5Config.emb_dim=32")
    expect_refusal(report, rc, out, "model.emb_dim: 64 -> 32")
    if open(os.path.join(d, "config.gin"), "rb").read() != before:
        report.fail("config.gin was changed by the refused run")
    report.resumes += 1
    drill.run(report, d)
    drill.check_end(report, d, drill.reference())


def corrupt_newest(drill: Drill, report: FaultReport, d: str) -> None:
    rc, _ = drill.run_until(report, d, at_step(drill.steps // 2 + 1), signal.SIGTERM)
    drill.lost_after_sigterm(report, d, rc)
    newest = max(chaos.checkpoint_steps(d))
    for root, _, files in os.walk(os.path.join(d, f"checkpoint_{newest}")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    report.resumes += 1
    _, out = drill.run(report, d)
    if f"checkpoint_{newest}: it does not restore" not in out and f"skipped {d}/checkpoint_{newest}" not in out:
        report.fail(f"the fallback from checkpoint_{newest} was not reported")
    drill.check_end(report, d, drill.reference())


def torn_metrics(drill: Drill, report: FaultReport, d: str) -> None:
    rc, _ = drill.run_until(report, d, at_step(3), signal.SIGTERM)
    drill.lost_after_sigterm(report, d, rc)
    with open(os.path.join(d, "metrics.jsonl"), "a") as f:
        f.write('{"step": 99, "split": "tr')
    report.resumes += 1
    drill.run(report, d)
    plot = subprocess.run([sys.executable, os.path.join(chaos.REPO, "scripts", "plot_metrics.py"), d],
                          capture_output=True, text=True, cwd=chaos.REPO)
    report.tracebacks += (plot.stdout + plot.stderr).count(TRACEBACK)
    if plot.returncode:
        report.fail(f"plot_metrics.py exited {plot.returncode}")
    losses, torn = chaos.read_train_losses(d)
    if torn > 1:
        report.fail(f"{torn} torn lines")
    drill.check_end(report, d, drill.reference())


FAULTS = {f.__name__: f for f in (sigterm_mid_save, sigterm_native, eval_best, disk_full, two_writers,
                                  changed_config, corrupt_newest, torn_metrics)}


def run_drill(faults, steps: int = 8, period: int = 2, work_dir: str = None) -> list:
    work_dir = work_dir or tempfile.mkdtemp(prefix="flan_jax_faults_")
    os.makedirs(work_dir, exist_ok=True)
    chaos._COMPILATION_CACHE = os.path.join(work_dir, "jax_cache")
    drill, reports = Drill(work_dir, steps, period), []
    for name in faults:
        report = FaultReport(name)
        d = os.path.join(work_dir, name)
        shutil.rmtree(d, ignore_errors=True)
        print(f"{name} -> {d}", flush=True)
        FAULTS[name](drill, report, d)
        print("  " + report.line(), flush=True)
        reports.append(report)
    return reports


def total(reports: list) -> FaultReport:
    out = FaultReport("total")
    for r in reports:
        for key in ("signals", "resumes", "divergent", "unreadable", "lost_steps", "tracebacks"):
            setattr(out, key, getattr(out, key) + getattr(r, key))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {list(FAULTS)}")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--checkpoint_period", type=int, default=2)
    parser.add_argument("--work_dir", default=None, help="default: a new temporary folder (kept for inspection)")
    args = parser.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    if not faults or set(faults) - set(FAULTS):
        parser.error(f"--faults: a subset of {list(FAULTS)}")
    t0 = time.time()
    reports = run_drill(faults, args.steps, args.checkpoint_period, args.work_dir)
    summary = total(reports)
    print(f"elapsed {time.time() - t0:.0f} s")
    for r in reports + [summary]:
        print(r.line())
    return 1 if summary.divergent or summary.unreadable or summary.lost_steps or summary.tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
