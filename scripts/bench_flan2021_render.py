#!/usr/bin/env python
"""Rendered + tokenized examples per second for a Flan 2021 mixture on TFDS mock data.

  python scripts/bench_flan2021_render.py [--mixture flan2021_train] [--examples 3000] [--mock_examples 200]

Two figures:
  python   registry rendering (template, options, few-shot) + ByteVocabulary tokenization of records already read
           into memory, over every task of the mixture in proportion to its rate: the cost of our data layer alone.
  seqio    the full seqio pipeline of the mixture (TFDS mock source -> render -> tokenize -> trim -> EOS, sampled
           by rate), split into start-up (first example: every task's pipeline is built) and steady-state rate.
Mock data is random text of 10-20 characters per field, so inputs are short; TFDS mock generation (numpy) is
part of the seqio figure. Single process, no parallelism beyond tf.data's defaults.
"""
import argparse
import os
import platform
import random
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import absl.logging  # noqa: E402

absl.logging.set_verbosity(absl.logging.ERROR)

import seqio  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

import flan_jax.tasks.flan2021  # noqa: E402,F401  (registers the collection)
from flan_jax.data import mixing, registry  # noqa: E402
from flan_jax.tasks.flan2021._common import serialized_tfds_load  # noqa: E402


def bench_python(mixture: str, num_examples: int, mock_examples: int) -> dict:
    rates = mixing.mixture_rates(mixture)
    vocabulary = seqio.ByteVocabulary()
    infos = [registry.task_info(t) for t in rates]
    prepared = {}
    with tfds.testing.mock_data(num_examples=mock_examples, policy=tfds.testing.MockPolicy.USE_CODE):
        for info in infos:
            if info.base_task in prepared:
                continue
            spec = registry.task_spec(info.base_task)
            values = []
            for index, record in spec.source.records("train"):
                try:
                    values.append((index, registry.normalize_record(spec, record)))
                except registry.MalformedRecordError:
                    pass
            prepared[info.base_task] = (spec, values)
    rng = random.Random(0)
    chosen = rng.choices(infos, weights=[rates[i.name] for i in infos], k=num_examples)
    input_tokens = target_tokens = 0
    start = time.perf_counter()
    for n, info in enumerate(chosen):
        spec, values = prepared[info.base_task]
        index, value = values[n % len(values)]
        pool = values if info.variant.startswith("fs_") else ()
        example = registry.render_example(spec, info.variant, "train", index, value, pool)
        input_tokens += len(vocabulary.encode(example["inputs"]))
        target_tokens += len(vocabulary.encode(example["targets"]))
    elapsed = time.perf_counter() - start
    return {"examples_per_s": num_examples / elapsed, "seconds": elapsed, "tasks": len(infos),
            "mean_input_tokens": input_tokens / num_examples, "mean_target_tokens": target_tokens / num_examples}


def bench_seqio(mixture: str, num_examples: int, mock_examples: int, lengths: dict) -> dict:
    with tfds.testing.mock_data(num_examples=mock_examples, policy=tfds.testing.MockPolicy.USE_CODE), \
            serialized_tfds_load():
        start = time.perf_counter()
        ds = seqio.get_mixture_or_task(mixture).get_dataset(lengths, split="train", shuffle=False, seed=0,
                                                            num_epochs=None)
        iterator = ds.as_numpy_iterator()
        next(iterator)
        startup = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(num_examples):
            next(iterator)
        elapsed = time.perf_counter() - start
    return {"examples_per_s": num_examples / elapsed, "seconds": elapsed, "startup_s": startup}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixture", default=flan_jax.tasks.flan2021.TRAIN_MIXTURE)
    parser.add_argument("--examples", type=int, default=3000, help="examples timed per figure")
    parser.add_argument("--mock_examples", type=int, default=200, help="mock records per TFDS split")
    parser.add_argument("--inputs_length", type=int, default=1024)
    parser.add_argument("--targets_length", type=int, default=256)
    parser.add_argument("--skip_seqio", action="store_true")
    args = parser.parse_args(argv)

    print(f"mixture {args.mixture}: {len(mixing.mixture_rates(args.mixture))} tasks; machine {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    py = bench_python(args.mixture, args.examples, args.mock_examples)
    print(f"python render+tokenize: {py['examples_per_s']:,.0f} examples/s ({args.examples} examples in "
          f"{py['seconds']:.2f}s; mean input {py['mean_input_tokens']:.0f} / target "
          f"{py['mean_target_tokens']:.0f} byte tokens)")
    if not args.skip_seqio:
        lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
        sq = bench_seqio(args.mixture, args.examples, args.mock_examples, lengths)
        print(f"seqio pipeline (mock TFDS -> render -> tokenize -> trim): {sq['examples_per_s']:,.0f} examples/s "
              f"steady state ({args.examples} examples in {sq['seconds']:.2f}s), start-up {sq['startup_s']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
