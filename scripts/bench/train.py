"""Train suite: our jitted train step (T5 1.1, optax Adafactor) vs HF transformers PyTorch T5 + transformers Adafactor.

CPU (the default): T5 1.1 tiny and small-shaped models, batch 8, feature lengths 512/128, float32 and bfloat16.
  - Both sides start from the same weights (ours copied into the HF model by name) and use all cores.
  - Adafactor on both sides: constant LR 1e-3, parameter scaling on, update clipping 1.0, decay rate 0.8, no momentum
    (transformers: scale_parameter=True, relative_step=False, warmup_init=False, clip_threshold=1.0, decay_rate=-0.8).
  - bfloat16 = bf16 activations with float32 parameters and optimizer state on both sides (ours: T5Config(dtype=
    'bfloat16'); HF: torch.autocast('cpu', torch.bfloat16)).
  - s/step and raw token slots/s: identical shapes, 8 x (512 + 128) token slots per step on both sides.
  - useful tokens/s on the Flan-like stream (lognormal lengths, mean inputs 190 / targets 12, sigma 0.5, trimmed to
    512/128): we pack it best-fit (flan_jax.packing) into 8 rows of 512/128; HF cannot pack an encoder-decoder, so it
    takes 8 examples per step padded to the longest input and target in the batch (dynamic padding, HF's best case).
  - MFU = 3 x forward FLOPs (t5.count_flops_per_example) / step time / matmul peak, where the peak is the better of
    JAX's and torch's square-matmul rate in that dtype, measured in the same run. "mfu" counts the FLOPs of the shapes
    computed (padding included); "useful_mfu" counts each real example at its own lengths.
  - The four timings (ours, HF fixed shape, HF dynamic padding, ours with dense attention scores for the
    span_vs_dense_attention row) alternate round by round, each side timing the
    second of two steps on its batch (the first absorbs the other framework's thread pool winding down); s/step is
    the median round (the machine may be shared), useful tokens/s is total real tokens / total time over the rounds. The matmul peak
    is measured before and after every model and the best figure is kept.
--quick: a small-shaped model with 1 encoder + 1 decoder layer ("t5_small_1l"), 2 rounds (tiny: full suite only).
Decoder-only rows (vs HF LlamaForCausalLM, raw / padded / packed via position_ids): see bench/_train_decoder.py.

GPU (jax.devices()[0].platform == 'gpu'): bf16 T5 1.1 base/large/xl (quick: base) packed at 1024/256 from a
lognormal stream with means 382/61 (the 190/12 stream would leave the 256-slot decoder ~3/4 padding), reporting
useful MFU against the measured bf16 matmul peak and against 989 TFLOP/s (H100 dense). No HF baseline there.
seqio/TensorFlow need not be installed on the GPU host: export packed batches on a CPU host with
  FLAN_BENCH_EXPORT_NPZ=DIR python scripts/benchmark.py train     (or: python scripts/bench/train.py --export-npz DIR)
and feed them with FLAN_BENCH_FROM_NPZ=DIR (or --from-npz DIR).
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` and `flan_jax` importable
  _SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path[:0] = [_SCRIPTS, os.path.dirname(_SCRIPTS)]

from bench import common, row  # noqa: E402

SUITE = "train"
CPU_LENGTHS = (512, 128)
CPU_BATCH = 8
GPU_LENGTHS = (1024, 256)
GPU_NPZ_NAME = "packed_1024_256.npz"
GPU_NPZ_ROWS = 1024
# At 1024/256 the 190/12 stream would leave ~3/4 of the decoder as padding; the GPU stream has the Flan 2022-like
# target/input ratio of the packing suite's c_lognormal_382_61 stream (mean 382 / 61, sigma 0.5).
GPU_STREAM_MEANS = (382, 61)
# name -> (preset, overrides, first batch size to try, remat); the batch halves on out-of-memory.
GPU_MODELS = {"base": ("base", {}, 64, "dots"), "large": ("large", {}, 32, "dots"), "xl": ("xl", {}, 16, "full")}
LEARNING_RATE = 1e-3
DTYPE_TAGS = {"float32": "fp32", "bfloat16": "bf16"}


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------

def packed_batches(examples, lengths, batch_size, num_batches):
  """Our input: the stream packed best-fit, `num_batches` batches of `batch_size` rows (seqio packed features)."""
  from flan_jax import packing

  rows = []
  for r in packing.pack_examples(examples, lengths):
    rows.append(r)
    if len(rows) == batch_size * num_batches:
      break
  if len(rows) < batch_size * num_batches:
    raise ValueError(f"train bench: the stream packs into {len(rows)} rows; need {batch_size * num_batches}")
  return [packing.encdec_feature_batch(rows[i:i + batch_size], lengths)
          for i in range(0, len(rows), batch_size)]


def padded_batches(examples, lengths, batch_size, num_batches, dynamic):
  """HF input: `batch_size` examples per batch, 0-padded to `lengths` (fixed) or to the batch's longest (dynamic)."""
  batches = []
  for b in range(num_batches):
    chunk = examples[b * batch_size:(b + 1) * batch_size]
    if len(chunk) < batch_size:
      raise ValueError(f"train bench: {len(examples)} examples are too few for {num_batches} batches")
    len_in = max(len(i) for i, _ in chunk) if dynamic else lengths[0]
    len_tg = max(len(t) for _, t in chunk) if dynamic else lengths[1]
    inputs = np.zeros((batch_size, len_in), np.int64)
    targets = np.zeros((batch_size, len_tg), np.int64)
    for k, (i, t) in enumerate(chunk):
      inputs[k, :len(i)], targets[k, :len(t)] = i[:len_in], t[:len_tg]
    batches.append({"encoder_input_tokens": inputs, "decoder_target_tokens": targets})
  return batches


def batch_flops(config, batch) -> float:
  """Forward FLOPs of the shapes computed (every row at full padded length)."""
  from flan_jax import models as model_api

  rows, len_in = batch["encoder_input_tokens"].shape
  return rows * model_api.flops_per_example(config, len_in, batch["decoder_target_tokens"].shape[1])


# ----------------------------------------------------------------------------------------------------------------
# The two trainers
# ----------------------------------------------------------------------------------------------------------------

def make_ours(config, seed=0, loss_config=None):
  """(state, step_fn) where step_fn(state, numpy batch) -> (state, loss) runs one jitted, blocking train step."""
  import jax

  from flan_jax.train import optim, step as step_lib

  optimizer = optim.make_adafactor(optim.AdafactorConfig(), optim.make_schedule(
      optim.ScheduleConfig(kind="constant", learning_rate=LEARNING_RATE)))
  state = step_lib.init_state(config, optimizer, jax.random.PRNGKey(seed))
  train_step = jax.jit(step_lib.make_train_step(config, optimizer, loss_config or step_lib.LossConfig()),
                       donate_argnums=0)

  def run_step(state, batch):
    state, metrics = train_step(state, batch)
    return state, float(jax.block_until_ready(metrics["loss"]))

  return state, run_step


def make_hf(config, params, dtype):
  """A step(batch) -> loss closure over an HF T5ForConditionalGeneration holding `params` and its Adafactor."""
  import torch
  import transformers
  from transformers.optimization import Adafactor

  from flan_jax.checkpoints import hf as hf_ckpt
  from flan_jax.checkpoints.t5x import flatten

  hf_config = dict(hf_ckpt.config_to_hf(config), dtype="float32")
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_config))
  flat = {p: np.array(a, np.float32) for p, a in flatten(params).items()}  # writable copies for torch
  weights = {name: torch.from_numpy(np.ascontiguousarray(flat[ours].T if transpose else flat[ours]))
             for name, (ours, transpose) in hf_ckpt.hf_name_map(config).items()}
  missing, unexpected = model.load_state_dict(weights, strict=False)
  missing = [m for m in missing if not m.endswith("embed_tokens.weight")]  # tied to `shared`
  if missing or unexpected:
    raise RuntimeError(f"train bench: HF weights missing {missing[:5]}, unexpected {unexpected[:5]}")
  model.train()
  optimizer = Adafactor(model.parameters(), lr=LEARNING_RATE, scale_parameter=True, relative_step=False,
                        warmup_init=False, clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=0.0)
  use_bf16 = dtype == "bfloat16"

  def run_step(batch):
    inputs = torch.from_numpy(batch["encoder_input_tokens"])
    labels = torch.from_numpy(batch["decoder_target_tokens"])
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
      loss = model(input_ids=inputs, attention_mask=inputs != 0, labels=labels.masked_fill(labels == 0, -100)).loss
    loss.backward()
    optimizer.step()
    return loss.detach().item()

  return run_step


# ----------------------------------------------------------------------------------------------------------------
# CPU comparison
# ----------------------------------------------------------------------------------------------------------------

class PeakTracker:
  """Square-matmul FLOP/s per (framework, dtype), the best of several measurements spread over the run (on a shared
  machine one short measurement can land in a busy moment and make every MFU look too high)."""

  def __init__(self, dtypes):
    self.dtypes = tuple(dtypes)
    self.rates = {(fw, d): 0.0 for fw in ("jax", "torch") for d in self.dtypes}

  def measure(self, seconds: float = 2.0) -> None:
    for dtype in self.dtypes:
      self.rates["jax", dtype] = max(self.rates["jax", dtype], common.jax_matmul_peak(dtype, seconds=seconds))
      self.rates["torch", dtype] = max(self.rates["torch", dtype], common.torch_matmul_peak(dtype, seconds=seconds))
      print(f"[train] matmul peak so far {dtype}: jax {self.rates['jax', dtype] / 1e9:.1f}, torch "
            f"{self.rates['torch', dtype] / 1e9:.1f} GFLOP/s", flush=True)

  def peak(self, dtype: str) -> float:
    """The device's peak in `dtype`: the better of JAX's and torch's matmul."""
    return max(self.rates["jax", dtype], self.rates["torch", dtype])

  def rows(self) -> list[dict]:
    return [row(SUITE, f"cpu_matmul_peak_{DTYPE_TAGS[d]}_gflops (jax vs torch)", self.rates["jax", d] / 1e9,
                self.rates["torch", d] / 1e9, "GFLOP/s") for d in self.dtypes]


def compare_cpu(label, config, rounds, seed=0) -> tuple[list[dict], dict]:
  """Interleaved ours / HF-fixed / HF-dynamic steps on one model and dtype.

  Returns (rows, achieved): `achieved` maps MFU row names to (ours, HF) FLOP/s, divided by the peak at the end."""
  import jax

  vocab_limit = min(config.vocab_size, 32000)
  examples = common.flan_like_examples(4000, CPU_LENGTHS, vocab_limit, seed=seed)
  ours_batches = packed_batches(examples, CPU_LENGTHS, CPU_BATCH, rounds + 1)
  hf_fixed = padded_batches(examples, CPU_LENGTHS, CPU_BATCH, rounds + 1, dynamic=False)
  hf_dynamic = padded_batches(examples[CPU_BATCH * (rounds + 1):], CPU_LENGTHS, CPU_BATCH, rounds + 1, dynamic=True)

  state, ours_step = make_ours(config, seed)
  # The same model with dense attention scores: the span path's own gain (models/span_attention.py).
  dense_state, dense_step = make_ours(dataclasses.replace(config, attention_block=0), seed)
  params_copy = jax.tree.map(np.asarray, state["params"])  # before the first (donating) step
  hf_step = make_hf(config, params_copy, config.dtype)
  del params_copy

  start = time.perf_counter()
  state, ours_loss = ours_step(state, ours_batches[0])  # compile + warm-up
  compile_s = time.perf_counter() - start
  dense_state, _ = dense_step(dense_state, ours_batches[0])
  hf_loss = hf_step(hf_fixed[0])
  hf_step(hf_dynamic[0])
  print(f"[train] {label}: first-step loss ours {ours_loss:.4f} (incl. z-loss) vs HF {hf_loss:.4f} (other batch); "
        f"ours compile+step {compile_s:.1f} s", flush=True)

  # Alternate the three, round by round. Each side runs its round's batch twice and only the second step is timed:
  # the first absorbs the hand-over (torch's OpenMP workers spin for a while after a step and slow whatever runs next
  # on the same cores; XLA's pool does the same to torch). Timing single alternating steps made both sides ~30%
  # slower than run alone, and by different amounts.
  holder = {"state": state, "dense": dense_state}

  def ours(batch):
    holder["state"], _ = ours_step(holder["state"], batch)

  def ours_dense_attention(batch):
    holder["dense"], _ = dense_step(holder["dense"], batch)

  sides = {"ours": (ours, ours_batches), "hf_fixed": (hf_step, hf_fixed), "hf_dynamic": (hf_step, hf_dynamic),
           "ours_dense_attention": (ours_dense_attention, ours_batches)}
  times = {side: [] for side in sides}
  for r in range(1, rounds + 1):
    for side, (fn, batches) in sides.items():
      fn(batches[r])
      start = time.perf_counter()
      fn(batches[r])
      times[side].append(time.perf_counter() - start)
  print(f"[train] {label}: s/step min/median/max ours {common.spread(times['ours'])}, HF fixed "
        f"{common.spread(times['hf_fixed'])}, HF dynamic {common.spread(times['hf_dynamic'])}, ours dense attention "
        f"{common.spread(times['ours_dense_attention'])}; load {common.load_average()}", flush=True)

  # Median, not min: rounds are adjacent in time, so both sides see the same load mix; a min favours whichever side
  # happened to hit a quiet moment.
  ours_s, hf_s = statistics.median(times["ours"]), statistics.median(times["hf_fixed"])
  slots = CPU_BATCH * sum(CPU_LENGTHS)
  flops_step = 3 * batch_flops(config, ours_batches[0])  # identical shapes on both sides
  timed = slice(1, rounds + 1)
  ours_useful = sum(common.real_tokens(b) for b in ours_batches[timed]) / sum(times["ours"])
  hf_useful = sum(common.real_tokens(b) for b in hf_dynamic[timed]) / sum(times["hf_dynamic"])
  ours_useful_flops = 3 * sum(common.useful_flops(config, b) for b in ours_batches[timed]) / sum(times["ours"])
  hf_useful_flops = 3 * sum(common.useful_flops(config, b) for b in hf_dynamic[timed]) / sum(times["hf_dynamic"])
  name = f"{label}_cpu_{DTYPE_TAGS[config.dtype]}"
  rows = [
      row(SUITE, f"{name}_s_per_step (lower is better)", ours_s, hf_s, "s/step"),
      row(SUITE, f"{name}_tokens_per_s", slots / ours_s, slots / hf_s, "token slots/s"),
      row(SUITE, f"{name}_useful_tokens_per_s", ours_useful, hf_useful, "real tokens/s"),
      row(SUITE, f"{name}_s_per_step_span_vs_dense_attention (ours, lower is better)", ours_s,
          statistics.median(times["ours_dense_attention"]), "s/step"),
  ]
  achieved = {f"{name}_mfu": (flops_step / ours_s, flops_step / hf_s),
              f"{name}_useful_mfu": (ours_useful_flops, hf_useful_flops)}
  return rows, achieved


def cpu_cases(quick):
  from flan_jax import models as model_api

  if quick:
    return [("t5_small_1l", model_api.T5Config.preset("small", num_encoder_layers=1, num_decoder_layers=1), 2)]
  return [("t5_tiny", model_api.T5Config.preset("tiny"), 4), ("t5_small", model_api.T5Config.preset("small"), 3)]


def selected_cpu_cases(quick, case=None) -> list[tuple]:
  """(label, config, rounds, compare) for every CPU case, or those whose label contains `case`."""
  from bench import _train_decoder  # decoder-only rows vs HF LlamaForCausalLM (see that module)

  cases = [c + (compare_cpu,) for c in cpu_cases(quick)]
  cases += [c + (_train_decoder.compare_cpu,) for c in _train_decoder.cpu_cases(quick)]
  if case is None:
    return cases
  chosen = [c for c in cases if case in c[0]]
  if not chosen:
    raise ValueError(f"train suite --case {case!r}: no CPU case label contains it (labels: "
                     f"{[c[0] for c in cases]})")
  return chosen


def run_cpu(quick, case=None, dtype=None) -> list[dict]:
  """All CPU cases (or those `selected_cpu_cases` picks), in both dtypes or only `dtype`."""
  import torch

  cases = selected_cpu_cases(quick, case)
  torch.set_num_threads(os.cpu_count() or 1)  # JAX's CPU client uses every core as well
  dtypes = ("float32", "bfloat16") if dtype is None else (dtype,)
  peaks = PeakTracker(dtypes)
  peak_seconds = 0.5 if quick else 2.0  # full: 3 measurements x 2 dtypes x 2 frameworks, ~50 s
  peaks.measure(peak_seconds)
  rows, mfu_rows = [], []
  for label, base_config, rounds, compare in cases:
    for dtype in dtypes:
      config = dataclasses.replace(base_config, dtype=dtype)
      case_rows, achieved = compare(label, config, rounds)
      rows += case_rows
      mfu_rows += [(name, dtype, ours, hf) for name, (ours, hf) in achieved.items()]
    if not quick:  # --quick measures the peak once, before its one model, to stay inside 3 minutes
      peaks.measure(peak_seconds)
  rows += [row(SUITE, name, ours / peaks.peak(dtype), hf / peaks.peak(dtype), "fraction of peak")
           for name, dtype, ours, hf in mfu_rows]
  return peaks.rows() + rows


# ----------------------------------------------------------------------------------------------------------------
# GPU path (bf16, packed 1024/256, fed from .npz when TF/seqio are absent)
# ----------------------------------------------------------------------------------------------------------------

def export_npz(out_dir: str, rows: int = GPU_NPZ_ROWS, seed: int = 0) -> str:
  """Packs the Flan-like stream at 1024/256 (T5 vocab ids) into `rows` rows and writes DIR/packed_1024_256.npz."""
  os.makedirs(out_dir, exist_ok=True)
  examples = common.flan_like_examples(rows * 4, GPU_LENGTHS, 32000, seed=seed, means=GPU_STREAM_MEANS)
  batch = packed_batches(examples, GPU_LENGTHS, rows, 1)[0]
  path = os.path.join(out_dir, GPU_NPZ_NAME)
  np.savez_compressed(path, **batch)
  print(f"[train] wrote {rows} packed rows ({GPU_LENGTHS[0]}/{GPU_LENGTHS[1]}) to {path}", flush=True)
  return path


def load_gpu_rows(from_npz) -> dict:
  """Packed feature rows [R, L]: from DIR/packed_1024_256.npz, or packed here when flan_jax.packing imports."""
  if from_npz:
    path = os.path.join(from_npz, GPU_NPZ_NAME) if os.path.isdir(from_npz) else from_npz
    if not os.path.exists(path):
      raise FileNotFoundError(f"train bench --from-npz: {path} not found (write it with --export-npz on a CPU host)")
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  examples = common.flan_like_examples(GPU_NPZ_ROWS * 4, GPU_LENGTHS, 32000, means=GPU_STREAM_MEANS)
  return packed_batches(examples, GPU_LENGTHS, GPU_NPZ_ROWS, 1)[0]


def _is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _gpu_accounting(batch):
  """(computed FLOPs, useful FLOPs, real tokens) functions for an encoder-decoder or a decoder-only packed batch."""
  if "encoder_input_tokens" in batch:
    return batch_flops, common.useful_flops, common.real_tokens
  from bench import _train_decoder as decoder_bench
  return (lambda c, b: decoder_bench.required_flops(c, b, False), lambda c, b: decoder_bench.required_flops(c, b, True),
          decoder_bench.real_tokens)


def gpu_model(label, config, batch_size, rows, peak, steps, tag=f"{GPU_LENGTHS[0]}_{GPU_LENGTHS[1]}") -> list[dict]:
  """Times `steps` packed bf16 steps (after 2 warm-up steps), halving the batch on out-of-memory."""
  import jax

  num_rows = len(next(iter(rows.values())))
  while batch_size >= 1:
    try:
      state, step_fn = make_ours(config)
      if num_rows < batch_size:
        raise ValueError(f"train bench: {num_rows} packed rows are fewer than batch {batch_size}")
      starts = [(i * batch_size) % (num_rows - batch_size + 1) for i in range(steps + 2)]
      batches = [jax.device_put({k: v[s:s + batch_size] for k, v in rows.items()}) for s in starts]
      for b in batches[:2]:
        state, _ = step_fn(state, b)
      start = time.perf_counter()
      for b in batches[2:]:
        state, _ = step_fn(state, b)
      seconds = (time.perf_counter() - start) / len(batches[2:])
      break
    except Exception as e:  # pylint: disable=broad-except
      if not _is_oom(e):
        raise
      print(f"[train] {label}: batch {batch_size} does not fit ({type(e).__name__}); halving", flush=True)
      state = batches = None
      batch_size //= 2
  else:
    raise RuntimeError(f"train bench: {label} does not fit on the GPU even at batch 1")
  host = jax.device_get(batches[2])
  computed_flops, useful_flops, real_tokens = _gpu_accounting(host)
  useful = 3 * useful_flops(config, host) / seconds
  computed = 3 * computed_flops(config, host) / seconds
  name = f"{label}_gpu_bf16_b{batch_size}_{tag}"
  print(f"[train] {label}: batch {batch_size}, {seconds:.3f} s/step, useful {useful / 1e12:.1f} TFLOP/s", flush=True)
  return [
      row(SUITE, f"{name}_s_per_step", seconds, None, "s/step"),
      row(SUITE, f"{name}_useful_tokens_per_s", real_tokens(host) / seconds, None, "real tokens/s"),
      row(SUITE, f"{name}_mfu", computed / peak, None, "fraction of measured peak"),
      row(SUITE, f"{name}_useful_mfu", useful / peak, None, "fraction of measured peak"),
      row(SUITE, f"{name}_useful_mfu_vs_989", useful / common.H100_BF16_DENSE_PEAK, None,
          "fraction of 989 TFLOP/s"),
  ]


def run_gpu(quick, from_npz) -> list[dict]:
  from flan_jax import models as model_api

  rows_np = load_gpu_rows(from_npz)
  peak = common.jax_matmul_peak("bfloat16", seconds=2.0)
  print(f"[train] GPU bf16 matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
  results = [row(SUITE, "gpu_matmul_peak_bf16_tflops (vs H100 dense 989)", peak / 1e12,
                 common.H100_BF16_DENSE_PEAK / 1e12, "TFLOP/s")]
  models = ["base"] if quick else list(GPU_MODELS)
  batch_override = int(os.environ.get("FLAN_BENCH_GPU_BATCH", "0"))
  for label in models:
    preset, overrides, batch_size, remat = GPU_MODELS[label]
    config = model_api.T5Config.preset(preset, dtype="bfloat16", param_dtype="float32", remat=remat, **overrides)
    results += gpu_model(f"t5_{label}", config, batch_override or batch_size, rows_np, peak, 5 if quick else 10)
  return results


# ----------------------------------------------------------------------------------------------------------------

def run(quick: bool, export_npz_dir: str | None = None, from_npz: str | None = None, case: str | None = None,
        dtype: str | None = None) -> list[dict]:
  export_npz_dir = export_npz_dir or os.environ.get("FLAN_BENCH_EXPORT_NPZ")
  from_npz = from_npz or os.environ.get("FLAN_BENCH_FROM_NPZ")
  if export_npz_dir:
    export_npz(export_npz_dir)
  if common.platform_name() == "gpu":
    return run_gpu(quick, from_npz)
  return run_cpu(quick, case, dtype)


if __name__ == "__main__":
  import argparse
  import json

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--export-npz", metavar="DIR", help="write packed 1024/256 rows for the GPU path and exit")
  parser.add_argument("--from-npz", metavar="DIR", help="feed the GPU path from DIR/packed_1024_256.npz")
  args = parser.parse_args()
  if args.export_npz:
    export_npz(args.export_npz)
  else:
    print(json.dumps(run(args.quick, from_npz=args.from_npz), indent=1))
