"""Pipeline suite: examples/s through templating + tokenizing + packing of the default training mixture.

  ours        `flan_default_train` as registered (flan_jax.registry renders records in Python, in chunks of 128
              examples per tf.data element) -> seqio tokenize/append EOS -> flan_jax PackedEncDecFeatureConverter.
  plain seqio what a user writing the same tasks by hand with seqio would run: per task a seqio.FunctionDataSource
              yielding the same raw records one per element (tf.data.Dataset.from_generator), a map preprocessor
              that renders each example with tf.py_function (the same template choice and options formatting, so
              both sides produce identical examples), seqio tokenize/append EOS, a seqio.Mixture with the same rates,
              and seqio.EncDecFeatureConverter(pack=True).
  native      train.input_pipeline='native' (flan_jax.native_pipeline): the same examples, rendered, tokenized,
              mixed and packed in Python without tf.data (reported as its own rows, against the same plain seqio).
Rendering is Python on both sides (templates pick a random template per example and format option lists, which tf
string ops alone cannot express without re-implementing the templates); the differences are how records reach
tf.data (chunked vs one element per record), and the packer.

Both read the mixture unshuffled with the same seed, so they sample the same task sequence; the suite checks that the
first examples are identical before timing (which also warms both up). Lengths 256/64 (the default CPU run). Timed:
iterating N mixture examples (quick 4k, full 30k) through the converter, batched by 64, including the start-up of
the 18 task sources (reported separately as the time to the first batch); the two alternate twice (--quick: once) and each
keeps its fastest pass. The full run also times rendering + tokenizing alone (no packing).
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

  from flan_jax import registry

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
  """(seconds, seconds to the first batch, examples read) for flan_jax.native_pipeline: the same tasks rendered,
  tokenized, mixed and packed in Python (train.input_pipeline='native'), until the packer has read N examples."""
  from flan_jax import native_pipeline
  from flan_jax.packing import PackedEncDecFeatureConverter

  converter = PackedEncDecFeatureConverter()
  first = None
  start = time.perf_counter()
  for _ in native_pipeline.packed_batches(MIXTURE, LENGTHS, 64, converter, shuffle=False, seed=0):
    first = first or time.perf_counter() - start
    if converter.stats.examples_in >= num_examples:
      break
  return time.perf_counter() - start, first, converter.stats.examples_in


def check_same_examples(ours, plain, count: int = 64) -> None:
  a = list(mixture_examples(ours, count).as_numpy_iterator())
  b = list(mixture_examples(plain, count).as_numpy_iterator())
  same = all((x["inputs"] == y["inputs"]).all() and (x["targets"] == y["targets"]).all() for x, y in zip(a, b))
  if len(a) != len(b) or not same:
    raise RuntimeError(f"pipeline bench: the plain seqio mixture does not yield the same first {count} examples "
                       "as ours; the comparison would be unfair")
  print(f"[pipeline] first {count} examples identical on both sides", flush=True)


def compare(label, ours_mixture, plain_mixture, make_ours, make_plain, num_examples, rounds=2) -> dict:
  seconds, firsts, rows = {"ours": [], "plain": []}, {"ours": [], "plain": []}, {}
  for _ in range(rounds):
    for side, mixture, make in (("ours", ours_mixture, make_ours), ("plain", plain_mixture, make_plain)):
      s, first, rows[side] = timed_pass(mixture, make(), num_examples)
      seconds[side].append(s)
      firsts[side].append(first)
  print(f"[pipeline] {label}: {num_examples} examples, s min/median/max ours {common.spread(seconds['ours'])} "
        f"({rows['ours']} rows, first batch after {common.best(firsts['ours']):.2f} s), plain seqio "
        f"{common.spread(seconds['plain'])} ({rows['plain']} rows, first batch after "
        f"{common.best(firsts['plain']):.2f} s); load {common.load_average()}", flush=True)
  return ({side: num_examples / common.best(seconds[side]) for side in seconds},
          {side: common.best(firsts[side]) for side in firsts})


def run(quick: bool) -> list[dict]:
  try:
    import seqio
  except ImportError as e:  # e.g. a GPU host fed from .npz batches: the input pipeline is measured on the CPU host
    print(f"[pipeline] skipped: {e}", flush=True)
    return []

  import tasks  # noqa: F401  (registers the embedded default collection)
  from flan_jax.packing import PackedEncDecFeatureConverter

  ours = seqio.get_mixture_or_task(MIXTURE)
  plain = register_plain_mixture(MIXTURE)
  check_same_examples(ours, plain)
  num_examples = 4_000 if quick else 30_000
  name = f"{MIXTURE}_{LENGTHS['inputs']}_{LENGTHS['targets']}_{num_examples // 1000}k"
  rates, firsts = compare("render+tokenize+pack", ours, plain, PackedEncDecFeatureConverter,
                          lambda: seqio.EncDecFeatureConverter(pack=True), num_examples, rounds=1 if quick else 2)
  results = [row(SUITE, f"{name}_render_tokenize_pack_examples_per_s", rates["ours"], rates["plain"], "examples/s"),
             row(SUITE, f"{name}_render_tokenize_pack_first_batch_s (lower is better)", firsts["ours"],
                 firsts["plain"], "s")]
  native = [timed_native(num_examples) for _ in range(1 if quick else 2)]
  seconds, first, count = min(native)
  print(f"[pipeline] native: {count} examples in {seconds:.2f} s (first batch after {first:.2f} s); "
        f"load {common.load_average()}", flush=True)
  results += [row(SUITE, f"{name}_native_render_tokenize_pack_examples_per_s", count / seconds, rates["plain"],
                  "examples/s"),
              row(SUITE, f"{name}_native_render_tokenize_pack_first_batch_s (lower is better)", first,
                  firsts["plain"], "s")]
  if not quick:
    rates, _ = compare("render+tokenize", ours, plain, lambda: None, lambda: None, num_examples)
    results.append(row(SUITE, f"{name}_render_tokenize_examples_per_s", rates["ours"], rates["plain"],
                       "examples/s"))
  return results
