"""QLoRA vs LoRA: s/step of the loop's jitted PEFT step and the frozen base's bytes, on one run config.

    python scripts/qlora_step_time.py --gin_file=gin_configs/runs/default_cpu.gin --rounds 20

Every side (LoRA on the float base, QLoRA int8 / int4 / nf4) is the loop's step (train/step.py make_train_step,
jitted by train/state.py jit_step with the frozen base as an undonated argument) on the same random base and the
same synthetic batch of the config's shape; all are compiled and warmed up first, then timed alternating step by
step, `rounds` rounds; the figure is the median. Weights are random: the time does not depend on their values.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
LORA = os.path.join(REPO, "gin_configs", "peft", "lora.gin")


def side(gin_files: list, mode, base_params, batch):
    """(run one step, frozen base bytes) for LoRA (mode None) or QLoRA `mode`."""
    import jax
    from flan_jax.cli import train as train_main
    from flan_jax.models import quant
    from flan_jax.train import optim, partitioning, peft_state, state as state_lib, step as step_lib
    flags = [f"--gin_file={f}" for f in gin_files] + [f"--gin_file={LORA}", "--gin.INIT_CHECKPOINT='x'"]
    cfg = train_main._configured(flags + ([f"--gin.PeftConfig.base_quantization='{mode}'"] if mode else []))[1]
    optimizer = optim.make_adafactor(cfg.adafactor, optim.make_schedule(cfg.schedule))
    mesh = partitioning.make_mesh(cfg.mesh)
    layout = state_lib.state_layout(cfg.model, optimizer, cfg.mesh, mesh)
    frozen = jax.device_put(quant.quantize_tree(base_params, mode) if mode else base_params, layout.frozen_shardings)
    state = state_lib.init_on_mesh(lambda rng: peft_state.init_trainable(cfg.model, rng, frozen), optimizer, layout,
                                   jax.random.PRNGKey(1))
    step = state_lib.jit_step(step_lib.make_train_step(cfg.model, optimizer, cfg.loss), layout,
                              partitioning.batch_sharding(mesh))
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch, frozen)
        jax.block_until_ready(metrics["loss"])
    return run, quant.nbytes(frozen)


def synthetic_batch(cfg, rng) -> dict:
    """Random tokens in the shapes the config's feature converter produces (no packing segments)."""
    from flan_jax import models
    from flan_jax.train import program
    shapes = program.batch_shapes(cfg.model, cfg.input.task_feature_lengths, cfg.input.global_batch_size)
    batch = {k: rng.integers(2, 1000, s).astype(np.int32) for k, s in shapes.items()
             if "segment" not in k and "position" not in k}
    for k in batch:
        if k.endswith("loss_weights") or k.endswith("causal_attention"):
            batch[k] = np.ones_like(batch[k])
    if "decoder_input_tokens" in batch and "decoder_target_tokens" in batch:
        batch["decoder_input_tokens"] = np.asarray(models.shift_right(batch["decoder_target_tokens"]))
    return batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", required=True)
    parser.add_argument("--modes", default="none,int8,int4,nf4")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    import jax
    from flan_jax import models
    from flan_jax.cli import train as train_main
    cfg = train_main._configured([f"--gin_file={f}" for f in args.gin_file])[1]
    base = models.init_params(cfg.model, jax.random.PRNGKey(0))
    batch = synthetic_batch(cfg, np.random.default_rng(0))
    modes = [None if m == "none" else m for m in args.modes.split(",")]
    sides = {m: side(args.gin_file, m, base, batch) for m in modes}
    for run, _ in sides.values():   # compile and warm up
        run(), run()
    times = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m, (run, _) in sides.items():
            t0 = time.perf_counter()
            run()
            times[m].append(time.perf_counter() - t0)
    print("| base | frozen base bytes | s/step (median) | vs LoRA |\n|---|---|---|---|")
    ref = statistics.median(times[modes[0]])
    for m, (_, nbytes) in sides.items():
        med = statistics.median(times[m])
        print(f"| {m or 'float (LoRA)'} | {nbytes:,} | {med:.4f} | {med / ref:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
