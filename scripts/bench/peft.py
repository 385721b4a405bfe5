"""PEFT suite: s/step, step memory and optimizer-state bytes of LoRA, adapters, prompt and prefix tuning vs full
finetuning, on the T5 small shape and a small Llama-like decoder shape.

  - The step is the loop's: train/step.py make_train_step (one microbatch, z-loss 1e-4), jitted with the loop's
    shardings on a one-device mesh and the train state donated. Full finetuning differentiates every parameter; PEFT
    takes the frozen base as an undonated third argument and trains `params['peft']` only (train/peft.py:
    split_params, init_trainable; train/state.py: state_layout, jit_step).
  - One optimizer for every side: Adafactor as gin_configs/peft/base.gin sets it (decay 0.8, clipping 1.0, no
    parameter scaling), constant LR 1e-3. The figures do not depend on the LR.
  - Methods at the gin_configs/peft/ defaults: LoRA rank 8 on attention q/k/v/o, adapters of width 16 after attention
    and MLP, 100 prompt tokens, 20 key/value prefixes per layer (no MLP).
  - Identical synthetic packed batches for every side (the same arrays): each row holds SEGMENTS equal segments.
    Prompt tuning takes the first 100 input positions of every segment (T5 encoder positions 0..99; decoder positions
    1..100 after BOS), as its packer would reserve them, so its rows are not longer than the others'.
  - s/step: every side is compiled and warmed up first; then the sides alternate step by step (common.interleaved),
    `rounds` rounds, all in one timer loop; the figure is the median round. Ratio = method / full finetuning.
  - step memory: XLA's plan for the compiled step (`compiled.memory_analysis()`): argument + output - aliased
    (donated state reused in place) + temp bytes, i.e. the buffers live during one step: parameters, optimizer state,
    batch, new state and scratch (activations, gradients). Not measured process RSS.
  - optimizer state bytes: the bytes of the Adafactor state pytree (`optimizer.init` of the trainable tree).
Shapes: T5 1.1 small (8 + 8 layers, emb 512, vocab 32128) and "llama_small_8l" (the train suite's decoder shape: 8
layers, emb 512, 8 heads / 4 KV heads of 64, SwiGLU 1376, vocab 32000, untied), batch 8 at 512 + 128 tokens (the
decoder row is 640), 2 segments per row, float32. --quick: 1 + 1 T5 layers and 2 decoder layers, batch 4, 2 rounds.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` and `flan_jax` importable
  _SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path[:0] = [_SCRIPTS, os.path.dirname(_SCRIPTS)]

from bench import common, row  # noqa: E402

SUITE = "peft"
FULL = "full"
METHODS = ("lora", "adapter", "prompt", "prefix")
LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int = 8
  lengths: tuple = (512, 128)   # (inputs, targets); the decoder row is their sum
  segments: int = 2             # packed segments per row
  rounds: int = 3
  prompt_length: int = 100      # gin_configs/peft/prompt.gin


FULL_SHAPE = Shape()
QUICK_SHAPE = Shape(batch=4, rounds=2)


def peft_config(method: str, shape: Shape):
  """The method at its gin_configs/peft/ defaults."""
  from flan_jax import models

  return {"lora": models.PeftConfig("lora", rank=8, alpha=16.0),
          "adapter": models.PeftConfig("adapter", adapter_dim=16),
          "prompt": models.PeftConfig("prompt", prompt_length=shape.prompt_length),
          "prefix": models.PeftConfig("prefix", prefix_length=20)}[method]


def cases(quick: bool) -> list:
  """(label, base model config) pairs: the T5 small shape and the train suite's small decoder shape."""
  from flan_jax import models

  decoder = dict(vocab_size=32000, emb_dim=512, num_heads=8, num_kv_heads=4, head_dim=64, mlp_dim=1376,
                 tie_embeddings=False, prefix_lm=True)
  if quick:
    return [("t5_small_1l", models.T5Config.preset("small", num_encoder_layers=1, num_decoder_layers=1)),
            ("llama_small_2l", models.DecoderConfig(num_layers=2, **decoder))]
  return [("t5_small", models.T5Config.preset("small")), ("llama_small_8l", models.DecoderConfig(num_layers=8, **decoder))]


# ----------------------------------------------------------------------------------------------------------------
# Synthetic packed batches (numpy only: no TF / seqio on the import path or in the run)
# ----------------------------------------------------------------------------------------------------------------

def _segment_layout(length: int, segments: int):
  """(segment ids, positions) of one row of `length` split into `segments` equal segments; the remainder pads."""
  width = length // segments
  ids = np.zeros(length, np.int32)
  pos = np.zeros(length, np.int32)
  for s in range(segments):
    ids[s * width:(s + 1) * width] = s + 1
    pos[s * width:(s + 1) * width] = np.arange(width)
  return ids, pos


def _shift_within_segments(targets: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Autoregressive inputs: targets shifted right by one inside each segment, BOS (0) at each segment start."""
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]
  inputs[(ids != np.roll(ids, 1, axis=1)) | (np.arange(ids.shape[1]) == 0)] = 0
  return inputs * (ids > 0)


def encdec_batch(shape: Shape, vocab_size: int, seed: int = 0) -> dict:
  """seqio EncDec packed features [batch, length] with `shape.segments` segments per row."""
  rng = np.random.default_rng(seed)
  (len_in, len_tg), b = shape.lengths, shape.batch
  enc_ids, enc_pos = _segment_layout(len_in, shape.segments)
  dec_ids, dec_pos = _segment_layout(len_tg, shape.segments)
  tile = lambda x: np.tile(x, (b, 1))
  enc_ids, enc_pos, dec_ids, dec_pos = map(tile, (enc_ids, enc_pos, dec_ids, dec_pos))
  targets = rng.integers(3, vocab_size, (b, len_tg), dtype=np.int32) * (dec_ids > 0)
  return {"encoder_input_tokens": rng.integers(3, vocab_size, (b, len_in), dtype=np.int32) * (enc_ids > 0),
          "encoder_segment_ids": enc_ids, "encoder_positions": enc_pos,
          "decoder_target_tokens": targets, "decoder_input_tokens": _shift_within_segments(targets, dec_ids),
          "decoder_segment_ids": dec_ids, "decoder_positions": dec_pos,
          "decoder_loss_weights": (dec_ids > 0).astype(np.int32)}


def prefix_lm_batch(shape: Shape, vocab_size: int, seed: int = 0) -> dict:
  """seqio PrefixLM packed features: each segment is inputs ++ targets, loss on its targets only."""
  rng = np.random.default_rng(seed)
  length, b = sum(shape.lengths), shape.batch
  ids, pos = _segment_layout(length, shape.segments)
  ids, pos = np.tile(ids, (b, 1)), np.tile(pos, (b, 1))
  input_width = shape.lengths[0] // shape.segments   # the segment's inputs, in proportion to the row
  targets = rng.integers(3, vocab_size, (b, length), dtype=np.int32) * (ids > 0)
  return {"decoder_target_tokens": targets, "decoder_input_tokens": _shift_within_segments(targets, ids),
          "decoder_segment_ids": ids, "decoder_positions": pos,
          "decoder_causal_attention": ((ids > 0) & (pos <= input_width)).astype(np.int32),
          "decoder_loss_weights": ((ids > 0) & (pos >= input_width)).astype(np.int32)}


def synthetic_batch(config, shape: Shape) -> dict:
  from flan_jax import models

  make = encdec_batch if models.is_encoder_decoder(config) else prefix_lm_batch
  return make(shape, min(config.vocab_size, 32000))


# ----------------------------------------------------------------------------------------------------------------
# One side: compiled step, its memory plan, a step closure
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Side:
  run: object                 # () -> None: one blocking train step on the shared batch
  memory_bytes: int           # argument + output - alias + temp of the compiled step
  temp_bytes: int
  opt_state_bytes: int
  trainable_params: int
  compile_s: float


def tree_bytes(tree) -> int:
  import jax
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _tree_size(tree) -> int:
  import jax
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def make_optimizer():
  from flan_jax.train import optim

  return optim.make_adafactor(optim.AdafactorConfig(multiply_by_parameter_scale=False), optim.make_schedule(
      optim.ScheduleConfig(kind="constant", learning_rate=LEARNING_RATE)))


def _memory(compiled) -> tuple[int, int]:
  stats = compiled.memory_analysis()
  if stats is None:  # some backends do not report
    return -1, -1
  live = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes
  return int(live), int(stats.temp_size_in_bytes)


def _compiled_side(jitted, state, args, opt_state_bytes, trainable) -> Side:
  """Compiles `jitted` for (state, *args) and wraps it as a Side whose run() steps a held, donated state."""
  import jax

  start = time.perf_counter()
  compiled = jitted.lower(state, *args).compile()
  compile_s = time.perf_counter() - start
  memory, temp = _memory(compiled)
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], *args)
    jax.block_until_ready(metrics["loss"])

  return Side(run, memory, temp, opt_state_bytes, trainable, compile_s)


def full_side(config, optimizer, base_params, batch, mesh) -> Side:
  """Full finetuning: the loop's jit of make_train_step over the whole tree (train/loop.py, without importing it:
  the loop imports seqio)."""
  import jax
  import jax.numpy as jnp

  from flan_jax.train import partitioning, step as step_lib

  shardings = {"step": partitioning.replicated(mesh), "nonfinite_step": partitioning.replicated(mesh),
               "params": jax.tree.map(lambda x: x.sharding, base_params)}
  params = jax.tree.map(jnp.copy, base_params)  # the state is donated; the base stays for the PEFT sides
  opt_state = optimizer.init(params)
  shardings["opt_state"] = jax.tree.map(lambda x: x.sharding, opt_state)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state,
           "nonfinite_step": jnp.full((), -1, jnp.int32)}
  step_fn = step_lib.make_train_step(config, optimizer, step_lib.LossConfig())
  jitted = jax.jit(step_fn, in_shardings=(shardings, partitioning.batch_sharding(mesh)),
                   out_shardings=(shardings, None), donate_argnums=(0,))
  return _compiled_side(jitted, state, (batch,), tree_bytes(opt_state), _tree_size(params))


def peft_side(config, optimizer, base_params, batch, mesh, mesh_cfg) -> Side:
  """PEFT: train/state.py's state layout and jit; the base is the frozen third argument."""
  import jax
  import jax.numpy as jnp

  from flan_jax.train import partitioning, peft_state as peft, state as state_lib, step as step_lib

  layout = state_lib.state_layout(config, optimizer, mesh_cfg, mesh)
  trainable = peft.init_trainable(config, jax.random.PRNGKey(1), base_params)
  state = jax.device_put(state_lib.new_state(trainable, optimizer), layout.shardings)
  step_fn = step_lib.make_train_step(config, optimizer, step_lib.LossConfig())
  jitted = state_lib.jit_step(step_fn, layout, partitioning.batch_sharding(mesh))
  return _compiled_side(jitted, state, (batch, base_params), tree_bytes(state["opt_state"]), _tree_size(trainable))


# ----------------------------------------------------------------------------------------------------------------

def compare(label: str, base_config, shape: Shape, methods: Sequence[str] = METHODS) -> list[dict]:
  """Rows for one model shape: every method vs full finetuning, timed interleaved in one loop."""
  import jax

  from flan_jax import models
  from flan_jax.train import partitioning

  mesh_cfg = partitioning.MeshConfig()
  mesh = partitioning.make_mesh(mesh_cfg, jax.devices()[:1])
  optimizer = make_optimizer()
  base_params = jax.device_put(models.init_params(base_config, jax.random.PRNGKey(0)), partitioning.replicated(mesh))
  batch = jax.device_put(synthetic_batch(base_config, shape), partitioning.batch_sharding(mesh))

  sides = {FULL: full_side(base_config, optimizer, base_params, batch, mesh)}
  for method in methods:
    config = dataclasses.replace(base_config, peft=peft_config(method, shape))
    sides[method] = peft_side(config, optimizer, base_params, batch, mesh, mesh_cfg)
  for side in sides.values():  # warm-up: thread pools, first-call allocations
    side.run()
  seconds = common.interleaved({name: side.run for name, side in sides.items()}, shape.rounds)
  print(f"[peft] {label}: compile s " + ", ".join(f"{n} {s.compile_s:.1f}" for n, s in sides.items())
        + "; s/step min/median/max " + ", ".join(f"{n} {common.spread(t)}" for n, t in seconds.items())
        + f"; load {common.load_average()}", flush=True)

  full, full_s = sides[FULL], statistics.median(seconds[FULL])
  name = f"{label}_b{shape.batch}_{shape.lengths[0]}_{shape.lengths[1]}"
  rows = [row(SUITE, f"{name}_full_s_per_step", full_s, None, "s/step"),
          row(SUITE, f"{name}_full_step_memory_mb", full.memory_bytes / 1e6, None, "MB (XLA plan)"),
          row(SUITE, f"{name}_full_opt_state_mb", full.opt_state_bytes / 1e6, None, "MB")]
  for method in methods:
    side = sides[method]
    rows += [
        row(SUITE, f"{name}_{method}_s_per_step (vs full)", statistics.median(seconds[method]), full_s, "s/step"),
        row(SUITE, f"{name}_{method}_step_memory_mb (vs full)", side.memory_bytes / 1e6, full.memory_bytes / 1e6,
            "MB (XLA plan)"),
        row(SUITE, f"{name}_{method}_temp_mb (vs full)", side.temp_bytes / 1e6, full.temp_bytes / 1e6,
            "MB (XLA plan)"),
        row(SUITE, f"{name}_{method}_opt_state_mb (vs full)", side.opt_state_bytes / 1e6, full.opt_state_bytes / 1e6,
            "MB"),
        row(SUITE, f"{name}_{method}_trainable_params (vs full)", float(side.trainable_params),
            float(full.trainable_params), "params"),
    ]
  return rows


def run(quick: bool, cases_override: Optional[list] = None, shape: Optional[Shape] = None,
        methods: Sequence[str] = METHODS) -> list[dict]:
  """All rows; `cases_override` / `shape` / `methods` replace the model shapes, batch and methods (tests run a tiny
  shape)."""
  shape = shape or (QUICK_SHAPE if quick else FULL_SHAPE)
  rows = []
  for label, config in cases_override or cases(quick):
    rows += compare(label, config, shape, methods)
  return rows


if __name__ == "__main__":
  import argparse
  import json

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true")
  print(json.dumps(run(parser.parse_args().quick), indent=1))
