"""TPU fit suite: the run configs for TPU slices compiled ahead of time for their target topology on this host
(`flan-jax compile`, flan_jax/train/compile.py; needs libtpu, the `tpu` extra). No TPU is used.

Rows per config: per-chip GiB (ours) against the chip's usable HBM (baseline; ratio = the fraction used), compile
seconds, and the traced step's matmul FLOPs against the model's FLOPs per step (ratio ~1.27 with remat 'full';
below 1 with LoRA, which computes no base-weight gradients). A config that does not fit gives its per-chip GiB from
the compiler's RESOURCE_EXHAUSTED message (ratio > 1). docs/tpu-fit.md records the table with its commands.

Every compile uses the lowest compile effort (`flan-jax compile --quick`, train.compile_effort = -1), as the fit table
of docs/tpu-fit.md does. --quick: the tiny T5 and decoder configs on v5e:2x2 (seconds); the full suite compiles the
16 run configs, 0.5-3 minutes each on a 2-core host and up to ~10 GB of host memory per compile.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make `bench` and `flan_jax` importable
  _SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path[:0] = [_SCRIPTS, os.path.dirname(_SCRIPTS)]

import jax  # noqa: E402

from bench import row  # noqa: E402
from flan_jax.cli import compile as cli_compile  # noqa: E402
from flan_jax.train import compile as compile_lib  # noqa: E402

SUITE = "tpu_fit"
# (label, gin files and flags, topology): every run config under gin_configs/runs/tpu/ on the topology it names.
CASES = (
    ("flan_t5_small@v5e:2x2", ["gin_configs/runs/tpu/flan_t5_small_v5e_2x2.gin"], "v5e:2x2"),
    ("flan_t5_base@v5e:2x2", ["gin_configs/runs/tpu/flan_t5_base_v5e_2x2.gin"], "v5e:2x2"),
    ("flan_t5_large@v5e:2x2", ["gin_configs/runs/tpu/flan_t5_large_v5e_2x2.gin"], "v5e:2x2"),
    ("flan_t5_xl@v5e:4x4", ["gin_configs/runs/tpu/flan_t5_xl_v5e_4x4.gin"], "v5e:4x4"),
    ("flan_t5_xxl@v5p:2x2x2", ["gin_configs/runs/tpu/flan_t5_xxl_v5p_2x2x2.gin"], "v5p:2x2x2"),
    ("flan_t5_xxl_lora@v5e:2x4", ["gin_configs/runs/tpu/flan_t5_xxl_lora_v5e_2x4.gin"], "v5e:2x4"),
    ("llama3_2_1b@v5e:2x2", ["gin_configs/runs/tpu/llama3_2_1b_v5e_2x2.gin"], "v5e:2x2"),
    ("llama3_2_1b_lora@v5e:2x2", ["gin_configs/runs/tpu/llama3_2_1b_lora_v5e_2x2.gin"], "v5e:2x2"),
    ("llama3_1_8b@v5p:2x2x2", ["gin_configs/runs/tpu/llama3_1_8b_v5p_2x2x2.gin"], "v5p:2x2x2"),
    ("llama3_1_8b_lora@v5e:2x2", ["gin_configs/runs/tpu/llama3_1_8b_lora_v5e_2x2.gin"], "v5e:2x2"),
    ("qwen2_5_0_5b@v5e:2x2", ["gin_configs/runs/tpu/qwen2_5_0_5b_v5e_2x2.gin"], "v5e:2x2"),
    ("qwen2_5_0_5b_lora@v5e:2x2", ["gin_configs/runs/tpu/qwen2_5_0_5b_lora_v5e_2x2.gin"], "v5e:2x2"),
    ("qwen2_5_7b@v5p:2x2x2", ["gin_configs/runs/tpu/qwen2_5_7b_v5p_2x2x2.gin"], "v5p:2x2x2"),
    ("qwen2_5_7b_lora@v5e:2x2", ["gin_configs/runs/tpu/qwen2_5_7b_lora_v5e_2x2.gin"], "v5e:2x2"),
    ("gemma_2b@v5e:2x2", ["gin_configs/runs/tpu/gemma_2b_v5e_2x2.gin"], "v5e:2x2"),
    ("gemma_2b_lora@v5e:2x2", ["gin_configs/runs/tpu/gemma_2b_lora_v5e_2x2.gin"], "v5e:2x2"),
)
QUICK_CASES = (
    ("t5_tiny@v5e:2x2", ["gin_configs/runs/default_cpu.gin", "--gin.BATCH_SIZE=8"], "v5e:2x2"),
    ("decoder_tiny@v5e:2x2", ["gin_configs/runs/default_cpu_decoder.gin", "--gin.BATCH_SIZE=8"], "v5e:2x2"),
)


def _argv(files_and_flags):
  return [a if a.startswith("--") else f"--gin_file={a}" for a in files_and_flags]


def _rows(label: str, report) -> list[dict]:
  used = report.total_gib if report.total_gib is not None else float("nan")
  rows = [row(SUITE, f"{label} GiB per chip (of usable HBM)", used, report.usable_gib, "GiB"),
          row(SUITE, f"{label} compile", report.compile_seconds, None, "s")]
  if report.traced_flops:   # XLA's own count takes a scanned layer once; the traced count takes every layer
    rows.append(row(SUITE, f"{label} traced / model FLOPs", report.traced_flops / 1e12,
                    report.model_flops / 1e12, "TFLOP per step"))
  return rows


def run(quick: bool = False) -> list[dict]:
  jax.config.update("jax_platforms", "cpu")   # no local accelerator is used
  rows = []
  for label, argv, topology in (QUICK_CASES if quick else CASES):
    cfg = compile_lib.with_settings(cli_compile.load_config(_argv(argv)), compile_effort=-1.0)
    report = compile_lib.compile_train_step(cfg, topology)
    print(f"{label}: {compile_lib.describe_fit(report)}", file=sys.stderr, flush=True)
    rows += _rows(label, report)
  return rows
