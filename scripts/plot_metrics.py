#!/usr/bin/env python
"""Plot MODEL_DIR/metrics.jsonl: train loss, and each eval metric per task (aggregates drawn bold).

    python scripts/plot_metrics.py runs/default [--out DIR]

Writes train_loss.png and eval_<metric>.png (into MODEL_DIR/plots by default) and prints their paths.
"""
import argparse
import collections
import json
import os
import sys


def load(model_dir):
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        sys.exit(f"plot_metrics: no metrics.jsonl in {model_dir}")
    rows, torn = [], 0
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:  # a line torn by a killed writer is skipped, not fatal
                r = json.loads(line)
            except ValueError:
                torn += 1
                continue
            if isinstance(r, dict) and isinstance(r.get("value"), (int, float)):
                rows.append(r)
    if torn:
        print(f"plot_metrics: skipped {torn} torn line(s) of {path}", file=sys.stderr)
    return rows


def series(rows, split, metric):
    """{task: [(step, value)]}; a step logged twice (a resumed run) keeps its last value."""
    by_task = collections.defaultdict(dict)
    for r in rows:
        if r["split"] == split and r["metric"] == metric:
            by_task[r["task"]][r["step"]] = r["value"]
    return {t: sorted(v.items()) for t, v in by_task.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load(args.model_dir)
    out = args.out or os.path.join(args.model_dir, "plots")
    os.makedirs(out, exist_ok=True)
    written = []

    train = series(rows, "train", "loss").get("all", [])
    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*train))
        ax.set(xlabel="step", ylabel="loss", title="train loss", yscale="log")
        ax.grid(alpha=0.3)
        written.append(os.path.join(out, "train_loss.png"))
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)

    eval_metrics = sorted({r["metric"] for r in rows if r["split"] == "eval"})
    for metric in eval_metrics:
        curves = series(rows, "eval", metric)
        fig, ax = plt.subplots(figsize=(8, 5))
        for task, points in sorted(curves.items()):
            aggregate = task.startswith("mean_")
            ax.plot(*zip(*points), marker="o", markersize=3, label=task,
                    linewidth=2.5 if aggregate else 1.0, alpha=1.0 if aggregate else 0.6)
        ax.set(xlabel="step", ylabel=metric, title=f"eval {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="best")
        written.append(os.path.join(out, f"eval_{metric.replace('/', '_')}.png"))
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
