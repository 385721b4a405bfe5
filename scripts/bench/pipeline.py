"""Pipeline suite: examples/s through templating + tokenizing + packing of the default training mixture.

Sides (each reads the same N mixture examples, unshuffled, seed 0):
  ours (seqio path)  `flan_default_train` as registered (flan_jax.data.registry renders records in Python, in chunks of
                     128 examples per tf.data element) -> seqio tokenize/append EOS -> Mixture sampling -> flan_jax
                     PackedEncDecFeatureConverter.
  native             train.input_pipeline='native' (flan_jax.pipeline.native.mixture_token_stream): the same tasks
                     rendered, tokenized and mixed in Python without tf.data, then flan_jax.packing.pack_examples.
  seqio get_dataset  what a FLAN user runs on the registered seqio Mixture: `Mixture.get_dataset` ->
                     `seqio.EncDecFeatureConverter(pack=True)`, i.e. `seqio.get_dataset(MIXTURE, LENGTHS,
                     EncDecFeatureConverter(pack=True), shuffle=False, seed=0)` with `.take(N)` between the two steps
                     so that it stops after N examples like the other sides.
  plain per-example  what a user writing the same tasks by hand with seqio would run: per task a
                     seqio.FunctionDataSource yielding the same raw records one per element
                     (tf.data.Dataset.from_generator), a map preprocessor that renders each example with
                     tf.py_function (the same template choice and options formatting, so both sides produce identical
                     examples), seqio tokenize/append EOS, a seqio.Mixture with the same rates, and
                     seqio.EncDecFeatureConverter(pack=True).
Rendering is Python on every side (templates pick a random template per example and format option lists, which tf
string ops alone cannot express without re-implementing the templates).

Every side is timed to the same point: from iterating the (already built) pipeline to the last batch of 64 rows, with
every one of the N examples emitted and the packer's buffer flushed inside the timer (the last batch may be short);
the time to the first batch (which includes opening the 18 task sources) is its own row. The suite checks that the
first examples of the seqio-path mixtures are identical before timing (which also warms them up). Lengths 256/64
(the default CPU run). N: quick 4k, full 30k; the sides alternate twice (--quick: once) and each keeps its fastest
pass. The full run also times rendering + tokenizing alone (no packing).
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from bench import common, row  # noqa: E402

SUITE = "pipeline"
MIXTURE = "flan_default_train"
LENGTHS = {"inputs": 256, "targets": 64}  # gin_configs/runs/default_cpu.gin
PLAIN_PREFIX = "bench_plain_"


def _record_signature(spec):
  import tensorflow as tf

  signature = {"index": tf.TensorSpec([], tf.int64)}
  signature.update({field: tf.TensorSpec([], tf.string) for field in spec.fields})
  if spec.options_field is not None:
    signature[spec.options_field] = tf.TensorSpec([None], tf.string)
  return signature


def register_plain_task(task_name: str) -> str:
  """Registers `bench_plain_<task>`: the same records and rendering as `task_name`, the seqio-by-hand way."""
  import seqio
  import tensorflow as tf

  from flan_jax.data import registry

  info = registry.task_info(task_name)
  spec, variant = registry.task_spec(info.base_task), info.variant
  signature = _record_signature(spec)
  keys = [k for k in signature if k != "index"]

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed

    def records():
      for index, record in spec.source.records(split):
        yield {"index": index, **{k: record[k] for k in keys}}

    return tf.data.Dataset.from_generator(records, output_signature=signature)

  def render_py(index, *values):
    record = {}
    for key, value in zip(keys, values):
      value = value.numpy()
      record[key] = value.decode() if isinstance(value, bytes) else [v.decode() for v in value]
    normalized = registry.normalize_record(spec, record)
    example = registry.render_example(spec, variant, "train", int(index.numpy()), normalized)
    return example["inputs"], example["targets"]

  def render(ex):
    inputs, targets = tf.py_function(render_py, [ex["index"]] + [ex[k] for k in keys], [tf.string, tf.string])
    inputs.set_shape([])
    targets.set_shape([])
    return {"inputs": inputs, "targets": targets}

  @seqio.map_over_dataset
  def render_map(ex):
    return render(ex)

  name = PLAIN_PREFIX + task_name
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  vocab = spec.vocabulary
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
      preprocessors=[render_map, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features={k: seqio.Feature(vocabulary=vocab, add_eos=True) for k in ("inputs", "targets")})
  return name


def register_plain_mixture(mixture_name: str):
  import seqio

  mixture = seqio.get_mixture_or_task(mixture_name)
  rates = [(register_plain_task(t.name), mixture.get_rate(t)) for t in mixture.tasks]
  name = PLAIN_PREFIX + mixture_name
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, rates)


def mixture_examples(mixture, num_examples: int):
  return mixture.get_dataset(LENGTHS, split="train", shuffle=False, seed=0, num_epochs=1).take(num_examples)


def timed_pass(mixture, converter, num_examples: int) -> tuple[float, float, int]:
  """(seconds, seconds to the first batch, batch rows) for N mixture examples through `converter` (None = no
  packing, just rendering). The dataset is built before the clock starts; iterating it (including opening every
  task's source, which the first batch waits for) is timed."""
  ds = mixture_examples(mixture, num_examples)
  if converter is None:  # unpacked examples have ragged lengths
    ds = ds.map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]}).ragged_batch(64)
  else:
    ds = converter(ds, LENGTHS).batch(64)
  rows, first = 0, None
  start = time.perf_counter()
  for batch in ds.as_numpy_iterator():
    first = first or time.perf_counter() - start
    rows += len(next(iter(batch.values())))
  return time.perf_counter() - start, first, rows


def timed_native(num_examples: int) -> tuple[float, float, int]:
  """(seconds, seconds to the first batch, packed rows) for flan_jax.pipeline.native: the first N examples of the
  mixture stream (train.input_pipeline='native'), packed to the end (buffer flushed) and batched by 64."""
  import itertools

  from flan_jax.pipeline import native as native_pipeline

  from flan_jax import packing

  converter = packing.PackedEncDecFeatureConverter()
  lengths = (LENGTHS["inputs"], LENGTHS["targets"])
  stats = packing.PackingStats()
  first, rows, total = None, [], 0
  start = time.perf_counter()
  examples = itertools.islice(native_pipeline.mixture_token_stream(MIXTURE, shuffle=False, seed=0), num_examples)
  for packed in packing.pack_examples(examples, lengths, stats=stats, **converter.packing_options):
    rows.append(packed)
    if len(rows) == 64:
      packing.encdec_feature_batch(rows, lengths, converter.bos_id)
      first, total, rows = first or time.perf_counter() - start, total + len(rows), []
  if rows:
    packing.encdec_feature_batch(rows, lengths, converter.bos_id)
    first, total = first or time.perf_counter() - start, total + len(rows)
  seconds = time.perf_counter() - start
  if stats.examples_packed != num_examples:
    raise RuntimeError(f"pipeline bench: native packed {stats.examples_packed} of {num_examples} examples")
  return seconds, first, total


def check_same_examples(ours, plain, count: int = 64) -> None:
  a = list(mixture_examples(ours, count).as_numpy_iterator())
  b = list(mixture_examples(plain, count).as_numpy_iterator())
  same = all((x["inputs"] == y["inputs"]).all() and (x["targets"] == y["targets"]).all() for x, y in zip(a, b))
  if len(a) != len(b) or not same:
    raise RuntimeError(f"pipeline bench: the plain seqio mixture does not yield the same first {count} examples "
                       "as ours; the comparison would be unfair")
  print(f"[pipeline] first {count} examples identical on both sides", flush=True)


def compare(label: str, sides: dict, num_examples: int, rounds: int = 2) -> tuple[dict, dict]:
  """Alternates the sides {name: () -> (seconds, first-batch seconds, rows)} `rounds` times; each keeps its fastest
  pass. Returns ({side: examples/s}, {side: first-batch seconds})."""
  seconds = {side: [] for side in sides}
  firsts = {side: [] for side in sides}
  rows = {}
  for _ in range(rounds):
    for side, timed in sides.items():
      s, first, rows[side] = timed()
      seconds[side].append(s)
      firsts[side].append(first)
  for side in sides:
    print(f"[pipeline] {label} {side}: {num_examples} examples, s min/median/max {common.spread(seconds[side])} "
          f"({rows[side]} rows, first batch after {common.best(firsts[side]):.2f} s); load {common.load_average()}",
          flush=True)
  return ({side: num_examples / common.best(seconds[side]) for side in sides},
          {side: common.best(firsts[side]) for side in sides})


def run(quick: bool) -> list[dict]:
  try:
    import seqio
  except ImportError as e:  # e.g. a GPU host fed from .npz batches: the input pipeline is measured on the CPU host
    print(f"[pipeline] skipped: {e}", flush=True)
    return []

  import flan_jax.tasks  # noqa: F401  (registers the embedded default collection)
  from flan_jax.packing import PackedEncDecFeatureConverter

  ours = seqio.get_mixture_or_task(MIXTURE)
  plain = register_plain_mixture(MIXTURE)
  check_same_examples(ours, plain)
  n = 4_000 if quick else 30_000
  name = f"{MIXTURE}_{LENGTHS['inputs']}_{LENGTHS['targets']}_{n // 1000}k"
  sides = {
      "native": lambda: timed_native(n),
      "ours_seqio_path": lambda: timed_pass(ours, PackedEncDecFeatureConverter(), n),
      "seqio_get_dataset": lambda: timed_pass(ours, seqio.EncDecFeatureConverter(pack=True), n),
      "plain_per_example": lambda: timed_pass(plain, seqio.EncDecFeatureConverter(pack=True), n),
  }
  rates, firsts = compare("render+tokenize+pack", sides, n, rounds=1 if quick else 2)
  results = []
  for ours_side in ("native", "ours_seqio_path"):
    for base in ("seqio_get_dataset", "plain_per_example"):
      results += [
          row(SUITE, f"{name}_{ours_side}_vs_{base}_examples_per_s", rates[ours_side], rates[base], "examples/s"),
          row(SUITE, f"{name}_{ours_side}_vs_{base}_first_batch_s (lower is better)", firsts[ours_side],
              firsts[base], "s")]
  if not quick:
    rates, _ = compare("render+tokenize", {"ours_seqio_path": lambda: timed_pass(ours, None, n),
                                           "plain_per_example": lambda: timed_pass(plain, None, n)}, n)
    results.append(row(SUITE, f"{name}_ours_seqio_path_vs_plain_per_example_render_tokenize_examples_per_s",
                       rates["ours_seqio_path"], rates["plain_per_example"], "examples/s"))
  return results
