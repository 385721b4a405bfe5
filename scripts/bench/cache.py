"""Cache suite: the preprocessed cache (Beam -> ArrayRecord -> Grain) against seqio's cache job and the native path.

  python scripts/benchmark.py cache [--quick] [--json F]

Data: `bench._many_tasks`, a generated collection registered at a chosen task count (the default collection's
generators, one seed, instruction paragraph and template wording per task, the default vocabulary), its zero-shot
and few-shot variants mixed example-proportionally (inputs of ~160 tokens zero-shot, ~500 few-shot). The same
total of train examples (36,000 per variant) is spread over 20, 200 and 1,800 tasks, so a figure that moves with the
task count is a per-task cost. Every side runs in its own fresh child process; peak memory is the largest summed RSS of that
process and its children (Beam workers), sampled every 0.2 s.

Rows:
  preprocess examples/s   ours: `flan-jax data cache bench_tasks` (DirectRunner, multi_processing, 2 workers,
                          train and validation splits, one shard per task and split). Baseline: seqio's
                          `python -m seqio.scripts.cache_tasks_main` over the same tasks' seqio twins (same rendered
                          source; tokenize, CacheDatasetPlaceholder, append EOS), the same runner options and
                          `--min_shards=1` (one shard per task and split, as ours). examples/s = cached examples /
                          wall seconds of the whole command, start-up included. The comparison runs 10 tasks of 900
                          records (9,000 per variant): seqio's workers grow with its number of Tasks, and at 20 tasks
                          they exceed this host's 23 GiB and are killed. Ours alone then runs the full 36,000 at 20,
                          200 and 1,800 tasks (flat memory).
  preprocess peak GiB     the same two commands' peak memory.
  first batch s           ours: `grain_input.cache_batches` over the cache; baseline: today's native path
                          (`native.packed_batches`); from building the stream (tasks already registered) to the first
                          batch of 64 packed 1024/256 rows, shuffled, seed 0.
  steady examples/s       examples packed per second after the first batch, same two sides; at 20 tasks also
                          the cache path with 2 Grain worker processes packing and batching (train.input_workers=2).
  input peak GiB          the child's peak RSS (imports and registration included), same two sides.
  resume first batch s    cache path only, at 1,800 tasks: a state saved after 10 batches, against the same state
                          with the mixed stream's index moved to where batch 100,000 stands (10,000 x its index);
                          restoring and reading the next batch.
  packed rows             the same 20,000 cached examples, in the same order, packed by our best-fit packer (ours) and
                          by Grain's BestFitPackIterDataset (baseline; 1,000 bins, its rows of the same lengths).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

SUITE = "cache"
LENGTHS = {"inputs": 1024, "targets": 256}
BATCH = 64
TOTAL_TRAIN = 36_000          # train records of the collection (per variant), at every task count
SEQIO_RECORDS = 9_000         # train records (per variant) of the comparison with seqio's cache job
SEQIO_TASKS = 10
_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))


def _env(tasks: int, **extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join([_REPO, os.path.dirname(_HERE)]),
               FLAN_BENCH_TASKS=str(tasks), FLAN_BENCH_EXAMPLES=str(TOTAL_TRAIN // tasks))
    env.update(extra)
    return env


def _measured(cmd: list, env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak GiB of the process tree, stdout) of a command; raises with its stderr when it fails."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, peak[0] / 2**30, out


def _cache_command(out: str) -> list:
    return [sys.executable, "-m", "flan_jax.cli", "data", "cache", "bench_tasks", "--output", out, "--module",
            "bench._many_tasks", "--num_shards", "1", "--direct_num_workers", "2"]


def preprocess(tasks: int, per_task: int, out_dir: str, seqio_too: bool) -> dict:
    """The cache jobs over `tasks` tasks of `per_task` train records: {side: (examples/s, peak GiB)}, and the
    directory of ours."""
    beam = ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    examples = 2 * tasks * (per_task + 8)  # two variants, train + validation (8 per task)
    ours_dir = os.path.join(out_dir, f"ours_{tasks}_{per_task}")
    seqio_cmd = [sys.executable, "-m", "seqio.scripts.cache_tasks_main", "--module_import=bench._many_tasks",
                 "--tasks=bench_t.*_seqio", f"--output_cache_dir={os.path.join(out_dir, f'seqio_{tasks}')}",
                 "--min_shards=1", "--pipeline_options=" + ",".join(beam)]
    sides = [("ours", _cache_command(ours_dir), _env(tasks, FLAN_BENCH_EXAMPLES=str(per_task)))]
    if seqio_too:
        sides.append(("seqio", seqio_cmd, _env(tasks, FLAN_BENCH_EXAMPLES=str(per_task), FLAN_BENCH_SEQIO_TWINS="1")))
    result = {"dir": ours_dir}
    for side, cmd, env in sides:
        seconds, gib, _ = _measured(cmd, env)
        result[side] = (examples / seconds, gib)
        print(f"[cache] preprocess {tasks} tasks x {per_task} {side}: {seconds:.1f} s, {gib:.2f} GiB", flush=True)
    _check_examples(ours_dir, examples)
    return result


def _check_examples(cache_dir: str, expected: int) -> None:
    with open(os.path.join(cache_dir, "manifest.json")) as f:
        manifest = json.load(f)
    cached = sum(split["examples"] for task in manifest["tasks"].values() for split in task.values())
    if cached != expected:
        raise RuntimeError(f"the cache holds {cached} examples, expected {expected}")


# --- the timed input child ------------------------------------------------------------------------------------------
def input_child(side: str, cache_dir: str, examples: int, resume: bool) -> dict:
    import bench._many_tasks as many  # noqa: F401  (registration, from the environment)
    from flan_jax.packing import PackedEncDecFeatureConverter
    from flan_jax.pipeline import native
    from flan_jax.pipeline.cache import grain_input

    def build(state=None):
        converter = PackedEncDecFeatureConverter()
        if side == "native":
            return native.packed_batches(many.MIXTURE, LENGTHS, BATCH, converter, seed=0), converter
        workers = 2 if side == "cache_workers" else 0
        return grain_input.cache_batches(cache_dir, many.MIXTURE, LENGTHS, BATCH, converter, seed=0,
                                         state=state, worker_count=workers), converter

    start = time.perf_counter()
    batches, converter = build()
    next(batches)
    result = {"first_batch_s": time.perf_counter() - start}
    first = converter.stats.examples_in
    start = time.perf_counter()
    while converter.stats.examples_in - first < examples:
        next(batches)
    result["examples_per_s"] = (converter.stats.examples_in - first) / (time.perf_counter() - start)
    result["encoder_fill"] = converter.stats.encoder_fill
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if resume:
        batches, _ = build()
        for _ in range(10):
            next(batches)
        state = batches.state()
        grain_state = state["grain"]
        far = dict(state, grain=dict(grain_state, parent=dict(grain_state["parent"],
                                                              next_index=grain_state["parent"]["next_index"] * 10_000)))
        for name, saved in (("resume_10_s", state), ("resume_100000_s", far)) * 2:  # best of two, alternating
            start = time.perf_counter()
            restored, _ = build(saved)
            next(restored)
            result[name] = min(result.get(name, float("inf")), time.perf_counter() - start)
    return result


def _input(side: str, tasks: int, cache_dir: str, examples: int, resume: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--cache_dir", cache_dir, "--examples",
           str(examples)] + ["--resume"] * resume
    _, _, out = _measured(cmd, _env(tasks))
    return json.loads(out.strip().splitlines()[-1])


def packer_rows(cache_dir: str, count: int) -> tuple[int, int]:
    """(rows of our packer, rows of Grain's BestFitPackIterDataset) over the same `count` cached examples."""
    import grain
    import numpy as np

    import bench._many_tasks as many
    from flan_jax import packing
    from flan_jax.pipeline.cache import grain_input

    mixed, _, _ = grain_input.example_dataset(cache_dir, many.MIXTURE, LENGTHS, seed=0)
    examples = [mixed[i] for i in range(count)]
    cut = [(np.asarray(i)[:LENGTHS["inputs"]], np.asarray(t)[:LENGTHS["targets"]]) for _, _, i, t in examples]
    packer = packing.ExamplePacker((LENGTHS["inputs"], LENGTHS["targets"]))
    ours = sum(len(packer.add(i, t)) for i, t in cut) + len(packer.flush())
    stream = grain.MapDataset.source([{"inputs": i, "targets": t} for i, t in cut]).to_iter_dataset()
    theirs = sum(1 for _ in grain.experimental.BestFitPackIterDataset(stream, length_struct=dict(LENGTHS),
                                                                       num_packing_bins=1000))
    return ours, theirs


def run(quick: bool) -> list[dict]:
    from bench import row

    counts = (20,) if quick else (20, 200, 1800)
    steady = 5_000 if quick else 40_000
    rows = []
    work = tempfile.mkdtemp(prefix="flan_jax_cache_bench_")
    try:
        # Against seqio: 10 tasks (20 seqio Tasks), what its job fits in this host's 23 GiB: its DirectRunner
        # workers grow with the number of Tasks (~9.5 GiB each at 20 tasks here, killed by the OOM killer).
        small = 250 if quick else SEQIO_RECORDS // SEQIO_TASKS
        sides = preprocess(SEQIO_TASKS, small, work, seqio_too=True)
        rows.append(row(SUITE, f"preprocess examples/s, {SEQIO_TASKS} tasks x {small}", sides["ours"][0],
                        sides["seqio"][0], "examples/s"))
        rows.append(row(SUITE, f"preprocess peak GiB, {SEQIO_TASKS} tasks x {small}", sides["ours"][1],
                        sides["seqio"][1], "GiB"))
        for tasks in counts:
            sides = preprocess(tasks, TOTAL_TRAIN // tasks, work, seqio_too=False)
            rows.append(row(SUITE, f"preprocess examples/s, {tasks} tasks", sides["ours"][0], None, "examples/s"))
            rows.append(row(SUITE, f"preprocess peak GiB, {tasks} tasks", sides["ours"][1], None, "GiB"))
            cache_dir = sides["dir"]
            ours = _input("cache", tasks, cache_dir, steady, resume=tasks == counts[-1])
            native = _input("native", tasks, cache_dir, steady)
            print(f"[cache] input {tasks} tasks: cache {ours}, native {native}", flush=True)
            rows.append(row(SUITE, f"first batch s, {tasks} tasks", ours["first_batch_s"], native["first_batch_s"],
                            "s"))
            rows.append(row(SUITE, f"steady examples/s, {tasks} tasks", ours["examples_per_s"],
                            native["examples_per_s"], "examples/s"))
            rows.append(row(SUITE, f"encoder fill, {tasks} tasks", ours["encoder_fill"], native["encoder_fill"],
                            "fraction"))
            rows.append(row(SUITE, f"input peak GiB, {tasks} tasks", ours["peak_rss_gib"], native["peak_rss_gib"],
                            "GiB"))
            if tasks == counts[0]:  # packing and batching in 2 Grain worker processes
                workers = _input("cache_workers", tasks, cache_dir, steady)
                rows.append(row(SUITE, f"steady examples/s, 2 input workers, {tasks} tasks",
                                workers["examples_per_s"], native["examples_per_s"], "examples/s"))
            if "resume_10_s" in ours:
                rows.append(row(SUITE, f"resume first batch s, step 100,000 vs step 10, {tasks} tasks",
                                ours["resume_100000_s"], ours["resume_10_s"], "s"))
        env_tasks = counts[0]
        os.environ.update(_env(env_tasks))
        import bench._many_tasks  # noqa: F401  (registers the 20-task collection in this process)
        ours_rows, grain_rows = packer_rows(os.path.join(work, f"ours_{env_tasks}_{TOTAL_TRAIN // env_tasks}"),
                                            5_000 if quick else 20_000)
        rows.append(row(SUITE, "packed rows, same examples (vs Grain BestFitPackIterDataset)", ours_rows, grain_rows,
                        "rows"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=("cache", "cache_workers", "native"), required=True)
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--examples", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    print(json.dumps(input_child(args.child, args.cache_dir, args.examples, args.resume)))


if __name__ == "__main__":
    sys.path[:0] = [_REPO, os.path.dirname(_HERE)]
    _main()
