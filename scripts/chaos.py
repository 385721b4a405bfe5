#!/usr/bin/env python
"""Preemption chaos test: SIGKILL training at random moments, resume, and check that nothing was lost.

  python scripts/chaos.py --runs 3 [--steps 36] [--checkpoint_period 4] [--max_kills 3] [--seed 0] [--work_dir DIR]

1. One uninterrupted reference run of gin_configs/runs/tiny_test.gin (keeps every checkpoint).
2. Each chaos run trains the same config in its own MODEL_DIR as a subprocess (`python -m flan_jax.train`) and kills
   it with SIGKILL 1..max_kills times, each time at a moment drawn from one of:
     during_checkpoint  as soon as an orbax temporary directory (`*.orbax-checkpoint-tmp*`) appears, after a random
                        0-30 ms (the write is in flight);
     at_step            right after a random step's metrics were written (often between two checkpoints);
     random_time        a random time after the process started (often during start-up or compilation).
   After each kill the same command is started again (it resumes from the latest checkpoint); after the last kill the
   run goes on to the end.
3. Per-step training losses (metrics.jsonl, split "train", metric "loss"; for a step written more than once the last
   line wins, since a resumed run rewrites the steps after its checkpoint) must equal the reference bitwise.
4. Every `checkpoint_<step>` left in any MODEL_DIR is restored with flan_jax.train.checkpointing.Checkpointer into the
   train state's shapes; it must load, carry its own step, and equal the reference run's checkpoint of that step.

Prints `N runs, R resumed, D divergent, U unreadable checkpoints` (R counts restarts after a kill; D counts runs whose
losses or checkpointed state differ from the reference, or that crashed) and exits non-zero when D or U > 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_GIN = os.path.join(REPO, "gin_configs", "runs", "tiny_test.gin")
KILL_MODES = ("during_checkpoint", "at_step", "random_time")
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")
TMP_MARKER = ".orbax-checkpoint-tmp"
POLL_S = 0.002
PROCESS_TIMEOUT_S = 900


@dataclasses.dataclass
class RunOutcome:
    name: str
    model_dir: str
    kills: list = dataclasses.field(default_factory=list)     # (mode, seconds after start, detail)
    resumes: int = 0
    problems: list = dataclasses.field(default_factory=list)  # human-readable reasons this run is divergent


@dataclasses.dataclass
class ChaosSummary:
    runs: int
    resumed: int
    divergent: int
    unreadable: int
    details: list

    def line(self) -> str:
        return (f"{self.runs} runs, {self.resumed} resumed, {self.divergent} divergent, "
                f"{self.unreadable} unreadable checkpoints")


def train_argv(model_dir: str, steps: int, checkpoint_period: int, keep_all: bool = False) -> list[str]:
    """Flags for flan_jax.train: tiny_test.gin, every step logged, no eval (keeps each run short)."""
    argv = [f"--gin_file={TINY_GIN}", f"--gin.MODEL_DIR={model_dir}", f"--gin.TRAIN_STEPS={steps}",
            f"--gin.CHECKPOINT_PERIOD={checkpoint_period}", "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=0",
            "--gin.EVAL_MIXTURE_OR_TASK_NAME=None"]
    if keep_all:
        argv.append("--gin.train.keep_checkpoints=100000")
    return argv


_COMPILATION_CACHE: Optional[str] = None  # set by run_chaos: shared JAX persistent cache (start-up cost only)


def _start(model_dir: str, argv: list[str], log_path: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0", PYTHONUNBUFFERED="1")
    if _COMPILATION_CACHE:
        env.update(JAX_COMPILATION_CACHE_DIR=_COMPILATION_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    log = open(log_path, "ab")
    log.write(f"\n=== start {time.strftime('%H:%M:%S')} {model_dir}\n".encode())
    log.flush()
    proc = subprocess.Popen([sys.executable, "-m", "flan_jax.train", *argv], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    proc._chaos_log = log  # closed once the process ends
    return proc


def _finish(proc: subprocess.Popen) -> int:
    rc = proc.wait()
    proc._chaos_log.close()
    return rc


# --- metrics ---------------------------------------------------------------------------------------------------------
def read_train_losses(model_dir: str) -> tuple[dict, int]:
    """({step: loss} with the last line per step winning, number of lines that are not valid JSON)."""
    path = os.path.join(model_dir, "metrics.jsonl")
    losses, bad = {}, 0
    if not os.path.exists(path):
        return losses, bad
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if row.get("split") == "train" and row.get("metric") == "loss":
                losses[int(row["step"])] = row["value"]
    return losses, bad


class _StepWatcher:
    """Follows metrics.jsonl as it grows and reports the largest train step written so far."""

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, "metrics.jsonl")
        self.offset = 0
        self.max_step = 0

    def poll(self) -> int:
        try:
            with open(self.path) as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.max_step
        complete = chunk[:chunk.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("split") == "train":
                self.max_step = max(self.max_step, int(row["step"]))
        return self.max_step


def _tmp_dirs(model_dir: str) -> set:
    try:
        return {n for n in os.listdir(model_dir) if TMP_MARKER in n}
    except FileNotFoundError:
        return set()


# --- one killed-and-resumed run ----------------------------------------------------------------------------------------
def _run_with_kill(model_dir: str, argv: list[str], log_path: str, mode: Optional[str], rng: random.Random,
                   steps: int, expected_duration_s: float) -> tuple[Optional[int], Optional[tuple]]:
    """Runs one process; kills it per `mode` (None: never). Returns (exit code or None if killed, kill record)."""
    proc = _start(model_dir, argv, log_path)
    t0 = time.time()
    watcher = _StepWatcher(model_dir)
    start_step = watcher.poll()
    target_step = rng.randint(start_step + 1, steps) if start_step < steps else steps
    kill_at_time = t0 + rng.uniform(0.0, expected_duration_s)
    tmp_delay = rng.uniform(0.0, 0.03)
    seen_tmp = _tmp_dirs(model_dir)  # leftovers of an earlier kill do not count as a write in flight
    tmp_seen_at = None
    last_metrics_poll = 0.0
    while True:
        if proc.poll() is not None:
            return _finish(proc), None
        now = time.time()
        if now - t0 > PROCESS_TIMEOUT_S:
            proc.kill()
            _finish(proc)
            raise RuntimeError(f"{model_dir}: training did not finish within {PROCESS_TIMEOUT_S} s (see {log_path})")
        fire, detail = False, ""
        if mode == "during_checkpoint":
            if tmp_seen_at is None:
                fresh = _tmp_dirs(model_dir) - seen_tmp
                if fresh:
                    tmp_seen_at, detail_tmp = now, sorted(fresh)[0]
            if tmp_seen_at is not None and now - tmp_seen_at >= tmp_delay:
                fire, detail = True, f"{detail_tmp} +{1000 * (now - tmp_seen_at):.0f}ms"
        elif mode == "at_step":
            if now - last_metrics_poll > 0.01:
                last_metrics_poll = now
                if watcher.poll() >= target_step:
                    fire, detail = True, f"step {watcher.max_step}"
        elif mode == "random_time":
            if now >= kill_at_time:
                fire, detail = True, f"step {watcher.poll()}"
        if fire:
            proc.send_signal(signal.SIGKILL)
            _finish(proc)
            return None, (mode, round(now - t0, 2), detail)
        time.sleep(POLL_S)


def chaos_run(name: str, model_dir: str, steps: int, checkpoint_period: int, max_kills: int, rng: random.Random,
              expected_duration_s: float, log_path: str, modes: tuple = KILL_MODES) -> RunOutcome:
    outcome = RunOutcome(name, model_dir)
    argv = train_argv(model_dir, steps, checkpoint_period)
    planned = [rng.choice(modes) for _ in range(rng.randint(1, max_kills))]
    if "during_checkpoint" in modes and "during_checkpoint" not in planned:  # every run is hit mid-write once
        planned[rng.randrange(len(planned))] = "during_checkpoint"
    for mode in planned + [None]:
        if outcome.kills:
            outcome.resumes += 1
        rc, kill = _run_with_kill(model_dir, argv, log_path, mode, rng, steps, expected_duration_s)
        if kill is not None:
            outcome.kills.append(kill)
            print(f"  {name}: SIGKILL {kill[0]} at {kill[1]} s ({kill[2]})", flush=True)
            continue
        if rc != 0:
            outcome.problems.append(f"training exited with code {rc} (see {log_path})")
            return outcome
        if mode is not None:
            print(f"  {name}: finished before the planned {mode} kill", flush=True)
        break
    return outcome


# --- checks ----------------------------------------------------------------------------------------------------------
def compare_losses(reference: dict, outcome: RunOutcome, steps: int) -> None:
    losses, bad_lines = read_train_losses(outcome.model_dir)
    if bad_lines:
        outcome.problems.append(f"{bad_lines} metrics.jsonl lines are not valid JSON (torn write?)")
    missing = [s for s in range(1, steps + 1) if s not in losses]
    if missing:
        outcome.problems.append(f"no loss logged for steps {missing[:10]}{'...' if len(missing) > 10 else ''}")
    differing = [s for s in range(1, steps + 1) if s in losses and losses[s] != reference[s]]
    if differing:
        s = differing[0]
        outcome.problems.append(f"loss differs at {len(differing)} steps, first step {s}: {losses[s]!r} vs "
                                f"reference {reference[s]!r}")


def checkpoint_steps(model_dir: str) -> list[int]:
    return sorted(int(m.group(1)) for m in map(CHECKPOINT_RE.match, os.listdir(model_dir)) if m)


def verify_checkpoints(reference_dir: str, outcomes: list, steps: int, checkpoint_period: int) -> tuple[int, list]:
    """Restores every checkpoint_<step> of every run; returns (number unreadable, messages)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    sys.path.insert(0, REPO)
    import jax
    import numpy as np
    from flan_jax.train import checkpointing, loop, optim, partitioning
    from flan_jax.cli import train as train_main

    _, cfg = train_main.load_config(train_argv(reference_dir, steps, checkpoint_period))
    optimizer = optim.make_adafactor(cfg.adafactor, optim.make_schedule(cfg.schedule))
    abstract, _ = loop.abstract_train_state(cfg.model, optimizer, cfg.mesh, partitioning.make_mesh(cfg.mesh))

    def restore(model_dir, step):
        ckpt = checkpointing.Checkpointer(model_dir, keep=None, async_save=False)
        try:
            return ckpt.restore(abstract, step=step)
        finally:
            ckpt.close()

    reference_states = {}
    unreadable, messages = 0, []
    for outcome in outcomes:
        for step in checkpoint_steps(outcome.model_dir):
            where = f"{outcome.name}/checkpoint_{step}"
            try:
                state, meta = restore(outcome.model_dir, step)
                if int(meta["step"]) != step or int(jax.device_get(state["step"])) != step:
                    raise ValueError(f"holds step {meta['step']} / {int(state['step'])}")
            except Exception as e:  # any failure to load is what this check counts
                unreadable += 1
                messages.append(f"unreadable {where}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            if outcome.model_dir == reference_dir or step not in checkpoint_steps(reference_dir):
                continue   # the reference itself, or an off-period save (a SIGTERM stop): it restores, that is all
            if step not in reference_states:
                reference_states[step] = jax.device_get(restore(reference_dir, step)[0])
            got = jax.device_get(state)
            leaves_ok = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), got, reference_states[step])
            bad = [jax.tree_util.keystr(p) for p, ok in jax.tree_util.tree_leaves_with_path(leaves_ok) if not ok]
            if bad:
                outcome.problems.append(f"checkpoint_{step} differs from the reference in {len(bad)} arrays, "
                                        f"e.g. {bad[0]}")
    return unreadable, messages


# --- driver ----------------------------------------------------------------------------------------------------------
def run_chaos(runs: int, steps: int = 36, checkpoint_period: int = 4, max_kills: int = 3, seed: int = 0,
              work_dir: Optional[str] = None, reference_dir: Optional[str] = None,
              modes: tuple = KILL_MODES, compilation_cache: bool = True) -> ChaosSummary:
    """The whole experiment; `reference_dir` reuses an uninterrupted run made with train_argv(..., keep_all=True).

    compilation_cache: share a JAX persistent compilation cache between the processes (saves start-up time; the
    reference run compiles and fills it, so resumed processes run the very same executables).
    """
    global _COMPILATION_CACHE
    work_dir = work_dir or tempfile.mkdtemp(prefix="flan_jax_chaos_")
    os.makedirs(work_dir, exist_ok=True)
    _COMPILATION_CACHE = os.path.join(work_dir, "jax_cache") if compilation_cache else None
    t_start = time.time()
    if reference_dir is None:
        reference_dir = os.path.join(work_dir, "reference")
        shutil.rmtree(reference_dir, ignore_errors=True)
        print(f"reference run -> {reference_dir}", flush=True)
        proc = _start(reference_dir, train_argv(reference_dir, steps, checkpoint_period, keep_all=True),
                      os.path.join(work_dir, "reference.log"))
        if _finish(proc) != 0:
            raise RuntimeError(f"the reference run failed; see {work_dir}/reference.log")
    reference_s = time.time() - t_start
    reference, bad_lines = read_train_losses(reference_dir)
    missing = [s for s in range(1, steps + 1) if s not in reference]
    if missing or bad_lines:
        raise RuntimeError(f"reference run {reference_dir} lacks losses for steps {missing} ({bad_lines} bad lines)")

    rng = random.Random(seed)
    outcomes = []
    for i in range(runs):
        name = f"run{i}"
        model_dir = os.path.join(work_dir, name)
        shutil.rmtree(model_dir, ignore_errors=True)
        print(f"chaos {name} -> {model_dir}", flush=True)
        outcome = chaos_run(name, model_dir, steps, checkpoint_period, max_kills, random.Random(rng.random()),
                            max(reference_s, 5.0), os.path.join(work_dir, f"{name}.log"), modes)
        if not outcome.problems:
            compare_losses(reference, outcome, steps)
        outcomes.append(outcome)

    reference_outcome = RunOutcome("reference", reference_dir)
    unreadable, messages = verify_checkpoints(reference_dir, [reference_outcome] + outcomes, steps,
                                              checkpoint_period)
    details = list(messages)
    for o in outcomes:
        leftovers = sorted(_tmp_dirs(o.model_dir))
        details.append(f"{o.name}: {len(o.kills)} kills {[k[0] for k in o.kills]}, {o.resumes} resumes, "
                       f"checkpoints {checkpoint_steps(o.model_dir)}, orbax tmp leftovers {leftovers}"
                       + (f"; DIVERGENT: {'; '.join(o.problems)}" if o.problems else ""))
    return ChaosSummary(runs=runs, resumed=sum(o.resumes for o in outcomes),
                        divergent=sum(1 for o in outcomes if o.problems), unreadable=unreadable, details=details)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=36, help="TRAIN_STEPS of every run")
    parser.add_argument("--checkpoint_period", type=int, default=4)
    parser.add_argument("--max_kills", type=int, default=3, help="each run is killed 1..max_kills times")
    parser.add_argument("--modes", default=",".join(KILL_MODES), help=f"comma-separated subset of {KILL_MODES}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=None, help="default: a new temporary folder (kept for inspection)")
    parser.add_argument("--reference_dir", default=None, help="reuse an uninterrupted run (see run_chaos)")
    parser.add_argument("--no_compilation_cache", action="store_true", help="compile afresh in every process")
    args = parser.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - set(KILL_MODES) or args.runs < 1 or args.max_kills < 1:
        parser.error(f"--runs and --max_kills must be >= 1 and --modes a subset of {KILL_MODES}")
    t0 = time.time()
    summary = run_chaos(args.runs, args.steps, args.checkpoint_period, args.max_kills, args.seed, args.work_dir,
                        args.reference_dir, modes,
                        not args.no_compilation_cache)
    for line in summary.details:
        print(line)
    print(f"elapsed {time.time() - t0:.0f} s")
    print(summary.line(), flush=True)
    return 1 if summary.divergent or summary.unreadable else 0


if __name__ == "__main__":
    sys.exit(main())
