"""PEFT quality on the default collection: from the default SFT run (trained on the seen clusters), tune each method
on the held-out cluster's train split and compare held-out accuracy before and after with full finetuning on the
same data and steps; the seen option tasks show what the frozen base keeps.

    python scripts/peft_experiment.py --base runs/default --out runs/peft_experiment --steps 150

Writes OUT/<method>/ (each a MODEL_DIR) and OUT/results.json; prints a Markdown table (docs/peft.md has the figures).
Accuracy is rank classification on the option tasks' validation records (disjoint from train).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

METHODS = ("full", "lora", "adapter", "prompt", "prefix")
HELDOUT_TRAIN = "flan_default_heldout_cluster_train"
OPTIONS_EVAL = "flan_default_options_eval"


def register_mixtures() -> tuple[list, list]:
    """(held-out option eval tasks, seen option eval tasks); registers the held-out cluster's train mixture (its
    zs_opt and zs_noopt variants, example-proportional, as the default train mixture is built) and an eval mixture of
    every option task."""
    from flan_jax.data import mixing, registry
    from flan_jax.tasks import default
    held = [n for n, spec in default.TASKS.items() if spec[0] in default.HELD_OUT_CLUSTERS]
    train = [f"{b}_{v}" for b in held for v in default.TRAIN_VARIANTS if f"{b}_{v}" in registry.list_tasks("default")]
    mixing.register_mixture(HELDOUT_TRAIN, mixing.example_proportional_rates(mixing.num_train_examples(train)))
    options = [n for n in default.TASKS if registry.task_spec(n).has_options]
    mixing.register_mixture(OPTIONS_EVAL, {f"{n}_zs_opt": 1.0 for n in options})
    return ([f"{n}_zs_opt" for n in options if n in held], [f"{n}_zs_opt" for n in options if n not in held])


def flags(method: str, args, model_dir: str) -> list:
    files = ["--gin_file=" + os.path.join(REPO, "gin_configs", "runs", "default_cpu.gin")]
    if method != "full":
        files.append("--gin_file=" + os.path.join(REPO, "gin_configs", "peft", f"{method}.gin"))
        base = [f"--gin.INIT_CHECKPOINT={args.base}"]
    else:
        base = [f"--gin.train.init_checkpoint='{args.base}'", f"--gin.LEARNING_RATE={args.full_lr}"]
    return [*files, *base, f"--gin.MODEL_DIR={model_dir}", f"--gin.MIXTURE_OR_TASK_NAME={HELDOUT_TRAIN}",
            f"--gin.EVAL_MIXTURE_OR_TASK_NAME={OPTIONS_EVAL}", f"--gin.TRAIN_STEPS={args.steps}",
            f"--gin.BATCH_SIZE={args.batch_size}", "--gin.EVAL_PERIOD=0", f"--gin.CHECKPOINT_PERIOD={args.steps}",
            "--gin.BEST_METRIC=None", f"--gin.EVAL_EXAMPLES_PER_TASK={args.eval_examples}", "--gin.LOG_PERIOD=25",
            *[f"--gin.{kv}" for kv in args.bind]]


def accuracies(results: dict, tasks: list) -> dict:
    return {t: float(results[t]["accuracy"]) for t in tasks}


def evaluate_base(args, out: str) -> dict:
    """The default run's checkpoint evaluated on the option tasks (`flan-jax eval`)."""
    from flan_jax.cli import train as train_main
    run_dir = os.path.join(out, "base_eval")
    argv = ["--gin_file=" + os.path.join(args.base, "config.gin"), f"--gin.MODEL_DIR={run_dir}",
            f"--gin.EVAL_MIXTURE_OR_TASK_NAME={OPTIONS_EVAL}", f"--gin.EVAL_EXAMPLES_PER_TASK={args.eval_examples}",
            f"--checkpoint={args.base}"]
    os.makedirs(run_dir, exist_ok=True)
    return train_main.eval_main(argv)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="runs/default")
    parser.add_argument("--out", default="runs/peft_experiment")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--eval_examples", type=int, default=128)
    parser.add_argument("--full_lr", type=float, default=1e-3, help="full finetuning LR (Flan finetuning default)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--bind", action="append", default=[], help="extra gin override NAME=value for every run")
    args = parser.parse_args(argv)
    args.base = os.path.abspath(args.base)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import flan_jax.tasks  # noqa: F401  (registers the default collection)
    from flan_jax.cli import train as train_main
    held, seen = register_mixtures()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    record = json.load(open(path)) if os.path.exists(path) else {}
    record["settings"] = {"steps": args.steps, "batch_size": args.batch_size, "eval_examples": args.eval_examples,
                          "full_lr": args.full_lr, "bind": args.bind, "base": args.base}
    if "base" not in record:
        t0 = time.time()
        res = evaluate_base(args, out)
        record["base"] = {"heldout": accuracies(res, held), "seen": accuracies(res, seen), "seconds": time.time() - t0}
        json.dump(record, open(path, "w"), indent=1)
    for method in args.methods.split(","):
        t0 = time.time()
        res = train_main.train_main(flags(method, args, os.path.join(out, method)))
        from flan_jax.train.metrics_log import read_metrics
        counts = {r["metric"]: r["value"] for r in read_metrics(os.path.join(out, method))
                  if r["metric"] in ("trainable_parameters", "total_parameters")}
        record[method] = {"heldout": accuracies(res, held), "seen": accuracies(res, seen),
                          "seconds": time.time() - t0, **counts}
        json.dump(record, open(path, "w"), indent=1)
    print(table(record, held))
    return 0


def table(record: dict, held: list) -> str:
    mean = lambda d: sum(d.values()) / len(d)
    base_held = mean(record["base"]["heldout"])
    full_gain = mean(record["full"]["heldout"]) - base_held if "full" in record else None
    lines = ["| method | trainable params | held-out acc (" + ", ".join(h.replace("_zs_opt", "") for h in held)
             + ") | gain | % of full FT gain | seen option acc | s |", "|---|---|---|---|---|---|---|"]
    lines.append(f"| base (default run) | - | {base_held:.3f} | - | - | {mean(record['base']['seen']):.3f} | - |")
    for method in [m for m in record if m not in ("base", "settings")]:   # peft/<method>.gin runs too (qlora)
        r = record[method]
        gain = mean(r["heldout"]) - base_held
        share = f"{100 * gain / full_gain:.0f}%" if full_gain else "-"
        lines.append(f"| {method} | {int(r.get('trainable_parameters', 0)):,} | {mean(r['heldout']):.3f} | "
                     f"{gain:+.3f} | {share} | {mean(r['seen']):.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
