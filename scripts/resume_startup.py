"""Input start-up cost of a resume, at an early and a late step (tiny_test.gin's input), native or seqio pipeline.

    PYTHONPATH=. python scripts/resume_startup.py [--steps 10,2000] [--pipeline native|seqio]

For each step s it runs the pipeline s batches once (what a replaying resume must redo, timed as `replay`), saves
its position as the trainer does (pickle of the train batches' state()), then times `resume`: load that file,
rebuild the pipeline from it and produce the next batch. The resumed batch is checked equal to the uninterrupted one.
"""
import argparse
import gc
import os
import pickle
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flan_jax.tasks  # noqa: E402,F401
from flan_jax import packing  # noqa: E402
from flan_jax.pipeline import batches as data_lib  # noqa: E402

MIXTURE, LENGTHS, BATCH = "flan_default_train", {"inputs": 128, "targets": 32}, 8


def build(pipeline, state=None):
    cfg = data_lib.InputConfig(MIXTURE, LENGTHS, BATCH, seed=0, pipeline=pipeline)
    return data_lib.train_batches(cfg, packing.PackedEncDecFeatureConverter(seed=0), input_state=state)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", default="10,2000")
    parser.add_argument("--pipeline", default="native", choices=["native", "seqio"])
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for step in steps:
            t0 = time.perf_counter()
            stream = build(args.pipeline)
            for _ in range(step):
                next(stream)
            replay = time.perf_counter() - t0
            path = os.path.join(tmp, f"step_{step}.pkl")
            with open(path, "wb") as f:
                pickle.dump(stream.state(), f, protocol=pickle.HIGHEST_PROTOCOL)
            expected = next(stream)
            del stream  # a restart has no old pipeline running (tf.data's read-ahead threads stop with it)
            gc.collect()
            t0 = time.perf_counter()
            with open(path, "rb") as f:
                resumed = build(args.pipeline, pickle.load(f))
            got = next(resumed)
            resume = time.perf_counter() - t0
            assert all(np.array_equal(got[k], expected[k]) for k in expected)
            del resumed  # nor keeps it running into the next measurement
            gc.collect()
            print(f"step {step:5d}: resume start-up {resume:.3f} s (state {os.path.getsize(path) / 2**20:.1f} MiB), "
                  f"replaying to it {replay:.2f} s", flush=True)


if __name__ == "__main__":
    main()
