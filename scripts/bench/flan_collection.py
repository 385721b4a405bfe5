"""Flan collection suite: the flan2021_train mixture through the native pipeline, packed at 1024/256.

  python scripts/benchmark.py flan_collection [--quick] [--json F]

The records are TFDS mock records (`tfds.testing.mocking.RandomFakeGenerator` over each builder's real feature
spec: random 10-20 character strings, random class labels, sequences of 10 so that parallel sequences
encode), but they are generated ONCE, outside any timer, and
written by each builder's own `download_and_prepare` (its real shard format, TFRecord, and dataset_info.json) into
a TFDS data_dir that is kept between runs (FLAN_BENCH_TFDS_DIR, default /tmp/flan_jax_bench_tfds). The timed run
then reads that data_dir the way a real run reads prepared data (`tfds.load`, via TFDS_DATA_DIR), so the mock
generator's own cost is not in the figures.

The timed part runs in a fresh child process (so peak RSS is the pipeline's alone, imports included):
  first_batch_s    from building the stream (registered mixture, 105 tasks over 56 datasets, shuffled per task with
                   seqio's 1000-example buffer, as in training) to the first batch of 64 packed 1024/256 rows
  examples_per_s   examples packed per second after the first batch (steady state), over N further examples
  peak_rss_gib     the child's peak resident set size (ru_maxrss)
Nothing here has a peer (FLAN's own generator is not installed); the rows compare with the goals of issue 21.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SUITE = "flan_collection"
MIXTURE = "flan2021_train"
LENGTHS = {"inputs": 1024, "targets": 256}
BATCH = 64
DEFAULT_DIR = "/tmp/flan_jax_bench_tfds"
MOCK_TRAIN, MOCK_VALIDATION = 500, 16  # mock records per split
_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))


def _quiet_env(**extra) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join([_REPO, os.path.dirname(_HERE)]))
  env.update(extra)
  return env


# ----------------------------------------------------------------------------------------------------------------
# Materializing mock records as prepared TFDS shards (once; never timed)
# ----------------------------------------------------------------------------------------------------------------

def _split_name(expression: str) -> str:
  return expression.split("[")[0]


def prepare_mock_builder(tfds_name: str, splits: dict, data_dir: str, seed: int = 0) -> bool:
  """Writes RandomFakeGenerator records for `splits` {tfds split: count} through the builder's own writer.

  Returns False when the data_dir already holds the prepared dataset. The download step is bypassed (the split
  generators yield mock records instead of reading downloads), everything after it is the builder's real code.
  """
  import types

  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import mocking

  builder = tfds.builder(tfds_name, data_dir=data_dir)
  if builder.is_prepared():
    return False
  features = builder.info.features

  def split_generators(dl_manager, *args, **kwargs):
    del dl_manager, args, kwargs
    return {split: ((f"{split}-{i}", example) for i, example in
                    enumerate(mocking.RandomFakeGenerator(features, count, seed=seed + n,
                                                             constant_dynamic_shape=True)))
            for n, (split, count) in enumerate(splits.items())}

  builder._split_generators = split_generators  # pylint: disable=protected-access
  # No download manager is needed (nothing is downloaded); download_and_prepare only records its sizes.
  builder._make_download_manager = lambda *a, **k: types.SimpleNamespace(  # pylint: disable=protected-access
      downloaded_size=0, download_dir=os.path.join(data_dir, "downloads"), manual_dir=None)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return True


def materialize(data_dir: str, num_train: int = MOCK_TRAIN, num_validation: int = MOCK_VALIDATION) -> None:
  """Prepares every flan2021 dataset's mock shards in `data_dir` (skips those already there)."""
  import flan_jax.tasks.flan2021 as flan2021

  start, built = time.perf_counter(), 0
  for dataset in flan2021.datasets():
    splits = {_split_name(dataset.splits["train"]): num_train,
              _split_name(dataset.splits["validation"]): num_validation}
    built += prepare_mock_builder(dataset.tfds_name, splits, data_dir)
  print(f"[flan_collection] {built} mock TFDS datasets prepared in {data_dir} "
        f"({time.perf_counter() - start:.1f} s, untimed)", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The timed child
# ----------------------------------------------------------------------------------------------------------------

def time_native(num_examples: int, seed: int = 0) -> dict:
  """First-batch latency, then steady examples/s over `num_examples` more examples (child process)."""
  import flan_jax.tasks.flan2021  # noqa: F401  (registration only)
  from flan_jax.pipeline import native as native_pipeline
  from flan_jax.packing import PackedEncDecFeatureConverter

  converter = PackedEncDecFeatureConverter()
  start, cpu_start = time.perf_counter(), time.process_time()
  batches = native_pipeline.packed_batches(MIXTURE, LENGTHS, BATCH, converter, shuffle=True, seed=seed)
  next(batches)
  first_batch_s, first_batch_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
  examples_at_first = converter.stats.examples_in
  steady_start, steady_cpu_start = time.perf_counter(), time.process_time()
  for _ in batches:
    if converter.stats.examples_in - examples_at_first >= num_examples:
      break
  steady_s, steady_cpu_s = time.perf_counter() - steady_start, time.process_time() - steady_cpu_start
  counted = converter.stats.examples_in - examples_at_first
  # CPU seconds (all threads) next to wall seconds: on a shared machine the wall figures only get worse.
  return {"first_batch_s": first_batch_s, "first_batch_cpu_s": first_batch_cpu_s,
          "examples_per_s": counted / steady_s, "examples_per_cpu_s": counted / steady_cpu_s,
          "steady_examples": counted,
          "examples_before_first_batch": examples_at_first,
          "encoder_fill": converter.stats.encoder_fill, "segments_per_row": converter.stats.segments_per_row,
          "dropped_or_truncated": converter.stats.truncated + converter.stats.dropped_overlength,
          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _child(data_dir: str, num_examples: int) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--examples", str(num_examples)]
  done = subprocess.run(cmd, env=_quiet_env(TFDS_DATA_DIR=data_dir), capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f"flan_collection worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool) -> list[dict]:
  from bench import common, row

  data_dir = os.environ.get("FLAN_BENCH_TFDS_DIR", DEFAULT_DIR)
  done = subprocess.run([sys.executable, os.path.abspath(__file__), "--materialize", data_dir], env=_quiet_env())
  if done.returncode:
    raise RuntimeError("flan_collection: materializing the mock TFDS data_dir failed")
  num_examples = 20_000 if quick else 100_000
  figures = _child(data_dir, num_examples)
  print(f"[flan_collection] {MIXTURE} native, packed {LENGTHS['inputs']}/{LENGTHS['targets']}: first batch after "
        f"{figures['first_batch_s']:.1f} s ({figures['first_batch_cpu_s']:.1f} CPU s; "
        f"{figures['examples_before_first_batch']} examples read), then {figures['examples_per_s']:,.0f} examples/s "
        f"({figures['examples_per_cpu_s']:,.0f} per CPU s) over {figures['steady_examples']}; peak RSS "
        f"{figures['peak_rss_gib']:.2f} GiB; encoder fill {figures['encoder_fill']:.3f}, "
        f"{figures['segments_per_row']:.1f} segments/row; load {common.load_average()}", flush=True)
  return [row(SUITE, "flan2021_native_examples_per_s", figures["examples_per_s"], 2000, "examples/s (vs goal)"),
          row(SUITE, "flan2021_native_first_batch_s (lower is better)", figures["first_batch_s"], 30, "s (vs goal)"),
          row(SUITE, "flan2021_native_peak_rss_gib (lower is better)", figures["peak_rss_gib"], 4, "GiB (vs goal)"),
          row(SUITE, "flan2021_native_examples_per_cpu_s", figures["examples_per_cpu_s"], None, "examples/CPU s"),
          row(SUITE, "flan2021_native_first_batch_cpu_s", figures["first_batch_cpu_s"], None, "CPU s")]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--materialize", metavar="DATA_DIR", help="prepare the mock TFDS data_dir and exit")
  parser.add_argument("--worker", action="store_true", help="(internal) time the pipeline; TFDS_DATA_DIR set")
  parser.add_argument("--examples", type=int, default=20_000)
  args = parser.parse_args(argv)
  sys.path[:0] = [_REPO]
  if args.materialize:
    materialize(args.materialize)
  elif args.worker:
    print(json.dumps(time_native(args.examples)), flush=True)
    os._exit(0)  # the figures are out; skip tearing down 105 suspended task streams
  else:
    parser.error("use scripts/benchmark.py flan_collection, or --materialize DIR")
  return 0


if __name__ == "__main__":
  sys.exit(main())
