"""Train suite, decoder-only rows: our jitted step (DecoderConfig, optax Adafactor) vs HF LlamaForCausalLM + transformers
Adafactor, on CPU. Called by bench/train.py's run_cpu; the MFU rows are divided by its matmul peak.

  - Same start: our initial params exported with flan_jax.checkpoints.export_hf and loaded by transformers.
  - Same optimizer on both sides as the T5 rows (constant LR 1e-3, parameter scaling, clipping 1.0, decay 0.8, no
    momentum); bfloat16 = bf16 activations, float32 params and optimizer state on both sides.
  - Causal LM over inputs ++ targets, loss on the targets (ours: prefix_lm=False, the packed rows' loss weights; HF:
    labels -100 elsewhere). One row = 512 + 128 = 640 token slots, batch 8.
  - raw tokens/s: identical shapes (8 x 640 slots) on both sides.
  - useful tokens/s on the Flan-like stream (mean inputs 190 / targets 12): we pack it best-fit into rows of 640 (no
    attention across segments); HF takes 8 examples per step padded to the batch's longest ("HF padded") and, as a
    second baseline, the SAME packed rows with position_ids and no attention mask, which transformers turns into a
    per-segment mask ("HF packed"; transformers >= 4.5x masking_utils.find_packed_sequence_indices).
  - Our step runs the output head at the loss positions only (LossConfig.head_chunk = 32: loss positions moved to
    the front of each row, as many chunks as the busiest row needs; exact). HF's LlamaForCausalLM computes logits at
    every position (its `logits_to_keep` takes one position set shared by all rows, which packed rows do not have). The
    row `..._sparse_vs_full_head` times our step with head_chunk=None on the same batches, to show that part.
  - Our self-attention computes each 128-query block's scores over the key span its segments reach
    (models/span_attention.py; exact). HF runs SDPA over the full [640, 640] masked scores. The row
    `..._span_vs_dense_attention` times our step with DecoderConfig.attention_block=0 (dense scores) on the same
    batches.
  - MFU rows count the FLOPs the batch needs: the layers over all slots (mfu) or the real tokens (useful_mfu), and
    the head at the loss positions only, for both sides.
  - Timing as the T5 rows: the sides alternate round by round, each timing the second of two steps on its batch;
    s/step is the median round, useful tokens/s total real tokens / total time.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

import numpy as np

from bench import common, row

SUITE = "train"
LENGTHS = (512, 128)
ROW_LENGTH = sum(LENGTHS)
BATCH = 8
DTYPE_TAGS = {"float32": "fp32", "bfloat16": "bf16"}


def cpu_cases(quick):
  from flan_jax import models

  small = dict(vocab_size=32000, emb_dim=512, num_heads=8, num_kv_heads=4, head_dim=64, mlp_dim=1376,
               tie_embeddings=False, prefix_lm=False)
  if quick:
    return [("llama_small_2l", models.DecoderConfig(num_layers=2, **small), 2)]
  return [("llama_small_8l", models.DecoderConfig(num_layers=8, **small), 3)]


def packed_batches(examples, num_batches, lengths=LENGTHS, batch_size=BATCH):
  """Our input: best-fit packed rows of inputs ++ targets (seqio PrefixLM packed features), `batch_size` per batch."""
  from flan_jax import packing

  rows = []
  for r in packing.pack_examples(examples, lengths, concatenate=True):
    rows.append(r)
    if len(rows) == batch_size * num_batches:
      break
  if len(rows) < batch_size * num_batches:
    raise ValueError(f"train bench (decoder): the stream packs into {len(rows)} rows; need {batch_size * num_batches}")
  return [packing.prefix_lm_feature_batch(rows[i:i + batch_size], sum(lengths))
          for i in range(0, len(rows), batch_size)]


# GPU check (scripts/gpu_check.sh): prefix-LM rows of 1024 + 256 slots from the GPU stream, exported on a CPU host.
GPU_LENGTHS = (1024, 256)
GPU_NPZ_NAME = "prefix_lm_1280.npz"
GPU_NPZ_ROWS = 256


def gpu_config(smoke: bool):
  """The Llama 3.2 1B shape (gin_configs/models/llama3_2_1b.gin) in bf16 with float32 params; smoke: a tiny one."""
  from flan_jax import models

  if smoke:
    return models.DecoderConfig(vocab_size=32000, dtype="bfloat16")
  return models.DecoderConfig(vocab_size=128256, emb_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                              head_dim=64, mlp_dim=8192, rope_theta=500000.0, rope_scaling=(32.0, 1.0, 4.0, 8192),
                              tie_embeddings=True, dtype="bfloat16", param_dtype="float32", remat="dots")


def export_gpu_npz(out_dir: str, means, rows: int = GPU_NPZ_ROWS, seed: int = 0) -> str:
  """Packs the GPU stream (token ids < 32000) into `rows` prefix-LM rows of 1280 and writes DIR/prefix_lm_1280.npz."""
  import os

  os.makedirs(out_dir, exist_ok=True)
  examples = common.flan_like_examples(rows * 6, GPU_LENGTHS, 32000, seed=seed, means=means)
  batch = packed_batches(examples, 1, GPU_LENGTHS, rows)[0]
  path = os.path.join(out_dir, GPU_NPZ_NAME)
  np.savez_compressed(path, **batch)
  print(f"[train] wrote {rows} packed prefix-LM rows ({sum(GPU_LENGTHS)} slots) to {path}", flush=True)
  return path


def load_gpu_rows(directory: str):
  """DIR/prefix_lm_1280.npz as a dict of arrays, or None when an older export lacks it."""
  import os

  path = os.path.join(directory, GPU_NPZ_NAME)
  if not os.path.exists(path):
    return None
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def padded_batches(examples, num_batches, dynamic):
  """One example per row, inputs ++ targets, 0-padded to ROW_LENGTH (fixed) or the batch's longest (dynamic)."""
  from flan_jax import packing

  out = []
  for b in range(num_batches):
    chunk = examples[b * BATCH:(b + 1) * BATCH]
    length = max(len(i) + len(t) for i, t in chunk) if dynamic else ROW_LENGTH
    out.append(packing.prefix_lm_feature_batch([[example] for example in chunk], length))
  return out


def hf_inputs(batch, packed):
  """(input_ids, labels, extra kwargs) for LlamaForCausalLM. Our targets are already shifted (target t is predicted at
  position t), so they go in as `shift_labels` too, which transformers then uses as they are."""
  import torch

  labels = torch.from_numpy(np.where(batch["decoder_loss_weights"] > 0, batch["decoder_target_tokens"], -100).astype(np.int64))
  ids = torch.from_numpy(batch["decoder_input_tokens"].astype(np.int64))
  extra = {"shift_labels": labels, "use_cache": False}  # with a cache transformers ignores packing
  if packed:
    extra["position_ids"] = torch.from_numpy(batch["decoder_positions"].astype(np.int64))
  else:
    extra["attention_mask"] = torch.from_numpy((batch["decoder_segment_ids"] > 0).astype(np.int64))
  return ids, labels, extra


def make_hf(config, params, dtype):
  import torch
  import transformers
  from transformers.optimization import Adafactor

  from flan_jax import checkpoints

  with tempfile.TemporaryDirectory() as tmp:
    checkpoints.export_hf(config, params, tmp)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
  model.train()
  optimizer = Adafactor(model.parameters(), lr=1e-3, scale_parameter=True, relative_step=False, warmup_init=False,
                        clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=0.0)

  def run_step(batch, packed=False):
    ids, labels, extra = hf_inputs(batch, packed)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      loss = model(input_ids=ids, labels=labels, **extra).loss
    loss.backward()
    optimizer.step()
    return loss.detach().item()

  return run_step


def real_tokens(batch) -> int:
  return int((batch["decoder_segment_ids"] > 0).sum())


def required_flops(config, batch, useful: bool) -> float:
  """Forward FLOPs a batch needs: the layers over every token slot (useful=False) or over the real tokens of each
  segment (useful=True), plus the output head at the loss positions only (the loss needs logits nowhere else; our
  step skips the rest, HF computes the head everywhere)."""
  from flan_jax import models

  if useful:
    lengths = common.segment_lengths(batch["decoder_segment_ids"])
    body = sum(models.flops_per_example(config, int(n), 0, head_positions=0) for per_row in lengths for n in per_row)
  else:
    rows, length = batch["decoder_input_tokens"].shape
    body = rows * models.flops_per_example(config, length, 0, head_positions=0)
  loss_positions = int((batch["decoder_loss_weights"] > 0).sum())
  return float(body + models.flops_per_example(config, 0, 0, head_positions=loss_positions))


def compare_cpu(label, config, rounds, seed=0):
  """(rows, achieved FLOP/s for the MFU rows) for one model and dtype; see the module doc."""
  import jax

  from bench import train as t5_train

  examples = common.flan_like_examples(4000, LENGTHS, config.vocab_size, seed=seed)
  ours_batches = packed_batches(examples, rounds + 1)
  hf_fixed = padded_batches(examples, rounds + 1, dynamic=False)
  hf_dynamic = padded_batches(examples[BATCH * (rounds + 1):], rounds + 1, dynamic=True)
  from flan_jax.train import step as step_lib

  state, ours_step = t5_train.make_ours(config, seed)
  full_state, full_head_step = t5_train.make_ours(config, seed, step_lib.LossConfig(head_chunk=None))
  dense_state, dense_step = t5_train.make_ours(dataclasses.replace(config, attention_block=0), seed)
  hf_step = make_hf(config, jax.tree.map(np.asarray, state["params"]), config.dtype)

  state, ours_loss = ours_step(state, ours_batches[0])  # compile + warm-up
  full_state, full_loss = full_head_step(full_state, ours_batches[0])
  dense_state, dense_loss = dense_step(dense_state, ours_batches[0])
  hf_loss = hf_step(ours_batches[0], packed=True)
  hf_step(hf_fixed[0])
  hf_step(hf_dynamic[0])
  print(f"[train] {label}: first-step loss ours {ours_loss:.4f} (incl. z-loss) vs HF packed {hf_loss:.4f} "
        "(same batch)", flush=True)
  print(f"[train] {label}: first-step loss, sparse head {ours_loss:.6f} vs full head {full_loss:.6f} vs dense "
        f"attention {dense_loss:.6f}", flush=True)
  holder = {"state": state, "full": full_state, "dense": dense_state}

  def ours(batch):
    holder["state"], _ = ours_step(holder["state"], batch)

  def ours_full_head(batch):
    holder["full"], _ = full_head_step(holder["full"], batch)

  def ours_dense_attention(batch):
    holder["dense"], _ = dense_step(holder["dense"], batch)

  sides = {"ours": (ours, ours_batches), "hf_fixed": (hf_step, hf_fixed), "hf_dynamic": (hf_step, hf_dynamic),
           "hf_packed": (lambda b: hf_step(b, packed=True), ours_batches),
           "ours_full_head": (ours_full_head, ours_batches),
           "ours_dense_attention": (ours_dense_attention, ours_batches)}
  times = {side: [] for side in sides}
  for r in range(1, rounds + 1):
    for side, (fn, batches) in sides.items():
      fn(batches[r])
      start = time.perf_counter()
      fn(batches[r])
      times[side].append(time.perf_counter() - start)
  print(f"[train] {label}: s/step " + ", ".join(f"{s} {common.spread(t)}" for s, t in times.items())
        + f"; load {common.load_average()}", flush=True)

  timed = slice(1, rounds + 1)
  useful = {side: sum(real_tokens(b) for b in sides[side][1][timed]) / sum(times[side]) for side in sides}
  ours_s, hf_s = statistics.median(times["ours"]), statistics.median(times["hf_fixed"])
  slots = BATCH * ROW_LENGTH
  name = f"{label}_cpu_{DTYPE_TAGS[config.dtype]}"
  rows = [
      row(SUITE, f"{name}_s_per_step (lower is better)", ours_s, hf_s, "s/step"),
      row(SUITE, f"{name}_tokens_per_s (vs HF LlamaForCausalLM)", slots / ours_s, slots / hf_s, "token slots/s"),
      row(SUITE, f"{name}_useful_tokens_per_s (vs HF padded)", useful["ours"], useful["hf_dynamic"],
          "real tokens/s"),
      row(SUITE, f"{name}_useful_tokens_per_s (vs HF packed, position_ids)", useful["ours"], useful["hf_packed"],
          "real tokens/s"),
      row(SUITE, f"{name}_s_per_step_sparse_vs_full_head (ours, lower is better)", ours_s,
          statistics.median(times["ours_full_head"]), "s/step"),
      row(SUITE, f"{name}_s_per_step_span_vs_dense_attention (ours, lower is better)", ours_s,
          statistics.median(times["ours_dense_attention"]), "s/step"),
  ]
  achieved_flops = lambda side, useful: 3 * sum(required_flops(config, b, useful)
                                                for b in sides[side][1][timed]) / sum(times[side])
  achieved = {f"{name}_mfu": (achieved_flops("ours", False), achieved_flops("hf_fixed", False)),
              f"{name}_useful_mfu (vs HF padded)": (achieved_flops("ours", True), achieved_flops("hf_dynamic", True))}
  return rows, achieved
