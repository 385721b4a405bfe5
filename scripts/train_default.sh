#!/usr/bin/env bash
# The main job: finetune a small T5 1.1 on the embedded default mixture (CPU), with periodic held-out eval.
# Writes runs/default/ (metrics.jsonl, TensorBoard events, checkpoints). Extra args go to `flan-jax train`,
# e.g. bash scripts/train_default.sh --gin.TRAIN_STEPS=100
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" ""
exec flan-jax train --gin_file=gin_configs/runs/default_cpu.gin "$@"
