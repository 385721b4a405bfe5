"""Shared pieces of the train / eval / pipeline suites: matmul peak, timers, Flan-like length streams, FLOP counts.

Nothing here imports TensorFlow or seqio, so the GPU path (fed from .npz batches) runs on a host without them.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

H100_BF16_DENSE_PEAK = 989e12  # FLOP/s, dense (1979 is the 2:4-sparse figure)

# The Flan-like length stream of the train suite (same as the packing suite's b_lognormal_190_12 stream): lognormal
# token counts with mean 190 (inputs) / 12 (targets), sigma 0.5 each, trimmed to the feature lengths.
FLAN_LIKE_MEAN_INPUTS = 190
FLAN_LIKE_MEAN_TARGETS = 12
FLAN_LIKE_SIGMA = 0.5


def load_average() -> str:
  try:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


def platform_name() -> str:
  """'gpu', 'tpu' or 'cpu': the platform of JAX's first device."""
  import jax
  return jax.devices()[0].platform


def sync(x):
  """Blocks until every array in the pytree `x` is computed (JAX dispatch is asynchronous)."""
  import jax
  return jax.block_until_ready(x)


def time_call(fn: Callable[[], object]) -> float:
  """Seconds one call of `fn` takes (fn must block until its work is done)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved(candidates: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
  """Times each candidate once per round, `repeats` rounds, alternating (fair on a shared, noisy machine).

  Returns {name: [seconds per round]}. Callers warm each candidate up before (compilation, thread pools).
  """
  seconds = {name: [] for name in candidates}
  for _ in range(repeats):
    for name, fn in candidates.items():
      seconds[name].append(time_call(fn))
  return seconds


def best(values: Sequence[float]) -> float:
  """The least disturbed of several timings (the machine is shared; interference only ever adds time)."""
  return min(values)


def spread(values: Sequence[float]) -> str:
  """'min/median/max' of timings, for the console log."""
  return f"{min(values):.3g}/{statistics.median(values):.3g}/{max(values):.3g}"


# ----------------------------------------------------------------------------------------------------------------
# Matmul peak
# ----------------------------------------------------------------------------------------------------------------

def jax_matmul_peak(dtype: str, size: Optional[int] = None, seconds: float = 1.0) -> float:
  """Best FLOP/s of a jitted square matmul chain in `dtype` ('float32' | 'bfloat16') with JAX on device 0.

  A chain of 4 dependent matmuls per call keeps dispatch overhead out of the figure; sizes 1024-2048 on CPU,
  8192 on GPU. Accumulation is float32 (as in the model).
  """
  import jax
  import jax.numpy as jnp

  on_gpu = platform_name() != "cpu"
  size = size or (8192 if on_gpu else 1536)
  chain = 4

  @jax.jit
  def matmuls(a, b):
    for _ in range(chain):
      a = jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(a.dtype)
    return a

  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  scale = 1.0 / np.sqrt(size)  # keeps values bounded along the chain
  a = (jax.random.normal(key_a, (size, size)) * scale).astype(dtype)
  b = (jax.random.normal(key_b, (size, size)) * scale).astype(dtype)
  sync(matmuls(a, b))
  flops = 2.0 * size**3 * chain
  best_rate, deadline = 0.0, time.perf_counter() + seconds
  while True:
    rate = flops / time_call(lambda: sync(matmuls(a, b)))
    best_rate = max(best_rate, rate)
    if time.perf_counter() > deadline:
      return best_rate


def torch_matmul_peak(dtype: str, size: int = 1536, seconds: float = 1.0) -> float:
  """Best FLOP/s of torch on the CPU, the same method as `jax_matmul_peak`: a chain of 4 dependent square matmuls
  in `dtype` per timed call, the same size and scaling (torch accumulates bf16 products in float32 too)."""
  import torch

  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  chain = 4
  generator = torch.Generator().manual_seed(0)
  scale = 1.0 / np.sqrt(size)
  a = (torch.randn(size, size, generator=generator) * scale).to(torch_dtype)
  b = (torch.randn(size, size, generator=generator) * scale).to(torch_dtype)

  def matmuls():
    x = a
    for _ in range(chain):
      x = torch.matmul(x, b)
    return x

  matmuls()
  flops = 2.0 * size**3 * chain
  best_rate, deadline = 0.0, time.perf_counter() + seconds
  while True:
    rate = flops / time_call(matmuls)
    best_rate = max(best_rate, rate)
    if time.perf_counter() > deadline:
      return best_rate


# ----------------------------------------------------------------------------------------------------------------
# Length streams and FLOPs
# ----------------------------------------------------------------------------------------------------------------

def lognormal_lengths(n: int, mean: float, sigma: float, cap: int, rng: np.random.Generator) -> np.ndarray:
  """n token counts ~ ceil(lognormal) with the given mean, clipped to [1, cap]."""
  return np.clip(np.ceil(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n)), 1, cap).astype(np.int64)


def flan_like_examples(n: int, lengths: tuple[int, int], vocab_size: int, seed: int = 0, eos_id: int = 1,
                       means: tuple[float, float] = (FLAN_LIKE_MEAN_INPUTS, FLAN_LIKE_MEAN_TARGETS),
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
  """n (inputs, targets) int32 token arrays, lognormal lengths with the given means (sigma 0.5), each ending in EOS,
  trimmed to lengths."""
  rng = np.random.default_rng(seed)
  lens_in = lognormal_lengths(n, means[0], FLAN_LIKE_SIGMA, lengths[0], rng)
  lens_tg = lognormal_lengths(n, means[1], FLAN_LIKE_SIGMA, lengths[1], rng)
  examples = []
  for li, lt in zip(lens_in, lens_tg):
    inputs = rng.integers(3, vocab_size, li, dtype=np.int32)
    targets = rng.integers(3, vocab_size, lt, dtype=np.int32)
    inputs[-1] = targets[-1] = eos_id
    examples.append((inputs, targets))
  return examples


def segment_lengths(segment_ids: np.ndarray) -> list[np.ndarray]:
  """Per packed row, the token count of each segment (segment id 0 = padding is left out)."""
  return [np.bincount(row[row > 0])[1:] for row in np.asarray(segment_ids)]


def useful_flops(config, batch: Mapping[str, np.ndarray]) -> float:
  """Forward FLOPs of the real examples in a batch, each counted at its own lengths (padding and cross-segment
  attention excluded). Packed batches are split by segment ids; unpacked rows count their non-padding tokens."""
  from flan_jax import models as model_api

  if "encoder_segment_ids" in batch:
    enc = segment_lengths(batch["encoder_segment_ids"])
    dec = segment_lengths(batch["decoder_segment_ids"])
    pairs = [(int(i), int(t)) for row_in, row_tg in zip(enc, dec) for i, t in zip(row_in, row_tg)]
  else:
    pairs = zip((np.asarray(batch["encoder_input_tokens"]) != 0).sum(-1).tolist(),
                (np.asarray(batch["decoder_target_tokens"]) != 0).sum(-1).tolist())
  return float(sum(model_api.flops_per_example(config, i, t) for i, t in pairs))


def real_tokens(batch: Mapping[str, np.ndarray]) -> int:
  """Non-padding input + target tokens of a (packed or padded) batch."""
  return int((np.asarray(batch["encoder_input_tokens"]) != 0).sum()
             + (np.asarray(batch["decoder_target_tokens"]) != 0).sum())
