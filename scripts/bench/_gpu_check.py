#!/usr/bin/env python
"""One-shot GPU check (driven by scripts/gpu_check.sh): T5 1.1 base and large, bf16, packed 1024/256, and the Llama
3.2 1B decoder shape on prefix-LM rows of 1280 slots, from .npz.

  python scripts/bench/_gpu_check.py --export DIR    # phase 1, CPU host with TF/seqio: DIR/packed_1024_256.npz and
                                                     # DIR/prefix_lm_1280.npz
  python scripts/bench/_gpu_check.py --from-npz DIR  # phase 2, GPU host with jax[cuda] only (no TF, no seqio)
  python scripts/bench/_gpu_check.py --from-npz DIR --smoke   # phase 2's code path on CPU: tiny model, 1 step

Phase 2 prints, per model: s/step, real tokens/s, MFU (FLOPs of the shapes computed) and useful MFU (each packed
example at its own lengths) against (a) the bf16 matmul peak measured here with the same chain as the CPU suites and
(b) the card's dense bf16 peak from its datasheet (CARD_DENSE_BF16 by device kind; FLAN_GPU_PEAK_TFLOPS overrides).
Then one attention-level check: `jax.nn.dot_product_attention` with an additive bias (T5's relative-position bias)
and a padding mask, cuDNN fused vs XLA, forward + backward at T5 base/large encoder shapes, output agreement and
speed-up. The model's own attention is the XLA path (flan_jax.models.t5); the check says whether switching pays.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_SCRIPTS, os.path.dirname(_SCRIPTS)]

from bench import common, row  # noqa: E402
from bench import _train_decoder  # noqa: E402  (no TF/seqio at import)
from bench import train as train_bench  # noqa: E402  (no TF/seqio at import)

# Dense (not 2:4 sparse) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's product datasheets.
CARD_DENSE_BF16 = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0,
                   "A100": 312.0, "L40S": 362.0, "L4": 121.0}
MODELS = (("base", 64, "dots"), ("large", 32, "dots"))  # preset, first batch to try (halved on OOM), remat
DECODER_BATCH = 16  # first batch of 1280-slot rows to try for the 1B decoder (halved on OOM)
STEPS = 8
IMPLEMENTATIONS = ("xla", "cudnn")


def card_peak(device_kind: str) -> tuple[str, float | None]:
  override = os.environ.get("FLAN_GPU_PEAK_TFLOPS")
  if override:
    return "FLAN_GPU_PEAK_TFLOPS", float(override) * 1e12
  for name, tflops in CARD_DENSE_BF16.items():  # most specific names first
    if name.lower() in device_kind.lower():
      return name, tflops * 1e12
  return device_kind, None


def attention_check(heads: int, head_dim: int, length: int = 1024, batch: int = 8) -> dict:
  """cuDNN vs XLA dot_product_attention with bias + mask, fwd+bwd seconds and max |difference| of the outputs."""
  import jax
  import jax.numpy as jnp

  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(key, (batch, length, heads, head_dim), jnp.bfloat16) for key in keys[:3])
  bias = jax.random.normal(keys[3], (1, heads, length, length), jnp.bfloat16)  # shared by the batch, as in T5
  lengths = jnp.arange(batch) * (length // batch) + length // batch
  valid = jnp.arange(length)[None, :] < lengths[:, None]
  mask = (valid[:, None, :, None] & valid[:, None, None, :])

  def make(implementation):
    def loss(q, k, v):
      out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=1.0, implementation=implementation)
      return jnp.sum(out.astype(jnp.float32) ** 2), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

  results = {}
  for implementation in IMPLEMENTATIONS:
    fn = make(implementation)
    (_, out), grads = fn(q, k, v)
    common.sync(grads)
    start = time.perf_counter()
    for _ in range(10):
      (_, out), grads = fn(q, k, v)
    common.sync(grads)
    results[implementation] = ((time.perf_counter() - start) / 10, out)
  valid_rows = valid[:, :, None, None]
  diff = float(jnp.max(jnp.where(valid_rows, jnp.abs(results["xla"][1].astype(jnp.float32)
                                                      - results[IMPLEMENTATIONS[-1]][1].astype(jnp.float32)),
                                            0.0)))
  return {"xla_s": results["xla"][0], "cudnn_s": results[IMPLEMENTATIONS[-1]][0], "max_abs_diff": diff}


def _vs_datasheet(model_rows, measured, card, card_name) -> list[dict]:
  """The MFU rows again, against the datasheet peak."""
  if not card:
    return []
  return [row("gpu_check", f"{r['name']}_vs_datasheet_{card_name.replace(' ', '_')}", r["ours"] * measured / card, None,
              "fraction of datasheet peak") for r in model_rows if r["name"].endswith("_mfu")]


def _decoder_rows(from_npz, smoke, measured, card, card_name) -> list[dict]:
  """The Llama 3.2 1B shape (bf16, remat dots) on prefix-LM rows of 1280 slots; XLA's dense attention."""
  rows_np = _train_decoder.load_gpu_rows(from_npz)
  if rows_np is None:
    print(f"[gpu_check] no {_train_decoder.GPU_NPZ_NAME} in {from_npz} (an older export): decoder skipped", flush=True)
    return []
  batch = int(os.environ.get("FLAN_BENCH_GPU_DECODER_BATCH", 2 if smoke else DECODER_BATCH))
  model_rows = train_bench.gpu_model("tiny_decoder" if smoke else "llama3_2_1b", _train_decoder.gpu_config(smoke),
                                     batch, rows_np, measured, 1 if smoke else STEPS, tag="prefix_lm_1280")
  return model_rows + _vs_datasheet(model_rows, measured, card, card_name)


def run(from_npz: str, smoke: bool = False) -> list[dict]:
  import jax

  from flan_jax import models as model_interface

  device = jax.devices()[0]
  if device.platform != "gpu" and not smoke:
    raise SystemExit(f"gpu_check: JAX's first device is {device.platform!r}, not a GPU; nothing to check here")
  rows_np = train_bench.load_gpu_rows(from_npz)
  measured = common.jax_matmul_peak("bfloat16", size=256 if smoke else None, seconds=0.2 if smoke else 2.0)
  card_name, card = card_peak(device.device_kind)
  print(f"[gpu_check] {device.device_kind}: measured bf16 matmul peak {measured / 1e12:.0f} TFLOP/s; datasheet "
        f"dense bf16 ({card_name}) {card / 1e12 if card else float('nan'):.0f} TFLOP/s", flush=True)
  results = [row("gpu_check", "bf16_matmul_peak_tflops (measured vs datasheet)", measured / 1e12,
                 card / 1e12 if card else None, "TFLOP/s")]
  models = (("tiny", 2, "none"),) if smoke else MODELS
  for preset, batch, remat in models:
    overrides = {"vocab_size": 32128} if smoke else {}  # the exported rows hold T5 vocabulary ids
    config = model_interface.T5Config.preset(preset, dtype="bfloat16", param_dtype="float32", remat=remat, **overrides)
    model_rows = train_bench.gpu_model(f"t5_{preset}", config, int(os.environ.get("FLAN_BENCH_GPU_BATCH", batch)),
                                       rows_np, measured, 1 if smoke else STEPS)
    results += model_rows + _vs_datasheet(model_rows, measured, card, card_name)
  results += _decoder_rows(from_npz, smoke, measured, card, card_name)
  if smoke:
    return results
  for preset, heads, head_dim in (("base", 12, 64), ("large", 16, 64)):
    try:
      figures = attention_check(heads, head_dim)
    except Exception as e:  # pylint: disable=broad-except  (cuDNN attention needs a recent GPU, cuDNN and JAX)
      print(f"[gpu_check] cuDNN attention with bias ({preset} shape): not available: {type(e).__name__}: {e}",
            flush=True)
      continue
    print(f"[gpu_check] attention {preset} shape fwd+bwd: xla {figures['xla_s'] * 1e3:.2f} ms, cudnn "
          f"{figures['cudnn_s'] * 1e3:.2f} ms, max |diff| {figures['max_abs_diff']:.3g}", flush=True)
    results.append(row("gpu_check", f"attention_{preset}_1024_bias_mask_fwd_bwd_s_cudnn_vs_xla (lower is better)",
                       figures["cudnn_s"], figures["xla_s"], "s"))
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  phase = parser.add_mutually_exclusive_group(required=True)
  phase.add_argument("--export", metavar="DIR", help="phase 1 (CPU host with TF/seqio): write the packed rows")
  phase.add_argument("--from-npz", metavar="DIR", help="phase 2 (GPU host): time the models on DIR's rows")
  parser.add_argument("--smoke", action="store_true", help="run phase 2's code on any device: tiny model, 1 step")
  args = parser.parse_args(argv)
  if args.export:
    train_bench.export_npz(args.export)
    _train_decoder.export_gpu_npz(args.export, train_bench.GPU_STREAM_MEANS)
    return 0
  results = run(args.from_npz, args.smoke)
  print("| name | ours | reference | unit |\n|---|---:|---:|---|")
  for r in results:
    reference = "-" if r["baseline"] is None else f"{r['baseline']:.4g}"
    print(f"| {r['name']} | {r['ours']:.4g} | {reference} | {r['unit']} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
