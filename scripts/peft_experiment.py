"""PEFT quality on the default collection: from the default SFT run (trained on the seen clusters), tune each method
on the held-out cluster's train split and compare held-out accuracy before and after with full finetuning on the
same data and steps; the seen option tasks show what the frozen base keeps.

    python scripts/peft_experiment.py --base runs/default --out runs/peft_experiment --steps 150

Writes OUT/<method>/ (each a MODEL_DIR) and OUT/results.json; prints a Markdown table (docs/peft.md has the figures).
Accuracy is rank classification on the option tasks' validation records (disjoint from train).

Paired seeds (docs/qlora.md): `--seed N` sets the SEED macro (LoRA's init and the data order); `--heldout_only`
scores only the held-out option tasks, once after training (`flan-jax eval` of the checkpoint), and writes the
per-example predictions to OUT/<method>/predictions/; `--compare OUT,OUT,...` then prints per seed the accuracy of
each method, the paired difference to the first method and its mean and standard error over seeds and examples:

    for s in 0 1 2; do python scripts/peft_experiment.py --out runs/qlora_seeds/seed$s --seed $s --heldout_only \
        --eval_examples 200 --methods lora,qlora,qlora_int8; done
    python scripts/peft_experiment.py --compare runs/qlora_seeds/seed0,runs/qlora_seeds/seed1,runs/qlora_seeds/seed2 \
        --methods lora,qlora,qlora_int8
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
HELDOUT_EVAL = "flan_default_heldout_options_eval"
# Method names that are another peft/<gin>.gin plus bindings (the QLoRA codes other than qlora.gin's NF4).
VARIANTS = {"qlora_int8": ("qlora", ["PeftConfig.base_quantization='int8'"]),
            "qlora_int4": ("qlora", ["PeftConfig.base_quantization='int4'"])}


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
    mixing.register_mixture(HELDOUT_EVAL, {f"{n}_zs_opt": 1.0 for n in options if n in held})
    return ([f"{n}_zs_opt" for n in options if n in held], [f"{n}_zs_opt" for n in options if n not in held])


def flags(method: str, args, model_dir: str, eval_mixture=OPTIONS_EVAL) -> list:
    """`flan-jax train` flags of one method; eval_mixture None: no eval in the run (scored afterwards)."""
    method, extra = VARIANTS.get(method, (method, []))
    files = ["--gin_file=" + os.path.join(REPO, "gin_configs", "runs", "default_cpu.gin")]
    if method != "full":
        files.append("--gin_file=" + os.path.join(REPO, "gin_configs", "peft", f"{method}.gin"))
        base = [f"--gin.INIT_CHECKPOINT={args.base}"]
    else:
        base = [f"--gin.train.init_checkpoint='{args.base}'", f"--gin.LEARNING_RATE={args.full_lr}"]
    seed = [] if args.seed is None else [f"--gin.SEED={args.seed}"]
    return [*files, *base, f"--gin.MODEL_DIR={model_dir}", f"--gin.MIXTURE_OR_TASK_NAME={HELDOUT_TRAIN}",
            f"--gin.EVAL_MIXTURE_OR_TASK_NAME={eval_mixture}", f"--gin.TRAIN_STEPS={args.steps}",
            f"--gin.BATCH_SIZE={args.batch_size}", "--gin.EVAL_PERIOD=0", f"--gin.CHECKPOINT_PERIOD={args.steps}",
            "--gin.BEST_METRIC=None", f"--gin.EVAL_EXAMPLES_PER_TASK={args.eval_examples}", "--gin.LOG_PERIOD=25",
            *seed, *[f"--gin.{kv}" for kv in [*extra, *args.bind]]]


def correct(predictions_dir: str, task: str) -> list:
    """Per-example correctness (prediction == target, as rank-classification accuracy counts) of one eval task."""
    from flan_jax.evaluation import predictions
    with open(predictions.file_in(predictions_dir, task)) as f:
        return [int(r["prediction"] == r["target"]) for r in map(json.loads, f)]


def train_then_score(method: str, args, model_dir: str, held: list) -> dict:
    """Trains without eval, then scores the held-out option tasks with `flan-jax eval` of the checkpoint (the frozen
    base restored and quantized again as for any eval), keeping the per-example predictions."""
    from flan_jax.cli import train as train_main
    train_main.train_main(flags(method, args, model_dir, eval_mixture=None))
    pred_dir = os.path.join(model_dir, "predictions")
    res = train_main.eval_main([*flags(method, args, model_dir, eval_mixture=HELDOUT_EVAL),
                                f"--checkpoint={model_dir}", f"--predictions_dir={pred_dir}"])
    out = {"heldout": accuracies(res, held), "seen": {}, "correct": {t: correct(pred_dir, t) for t in held}}
    for t in held:   # the per-example file is the accuracy's own record
        assert abs(sum(out["correct"][t]) / len(out["correct"][t]) - out["heldout"][t]) < 1e-9, t
    return out


def accuracies(results: dict, tasks: list) -> dict:
    return {t: float(results[t]["accuracy"]) for t in tasks}


def evaluate_base(args, out: str) -> dict:
    """The default run's checkpoint evaluated on the option tasks (`flan-jax eval`)."""
    from flan_jax.cli import train as train_main
    run_dir = os.path.join(out, "base_eval")
    mixture = HELDOUT_EVAL if args.heldout_only else OPTIONS_EVAL
    argv = ["--gin_file=" + os.path.join(args.base, "config.gin"), f"--gin.MODEL_DIR={run_dir}",
            f"--gin.EVAL_MIXTURE_OR_TASK_NAME={mixture}", f"--gin.EVAL_EXAMPLES_PER_TASK={args.eval_examples}",
            "--gin.BEST_METRIC=None", f"--checkpoint={args.base}"]
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
    parser.add_argument("--seed", type=int, default=None, help="SEED macro (LoRA init, data order); default: gin's 0")
    parser.add_argument("--heldout_only", action="store_true",
                        help="score only the held-out option tasks, after training, keeping per-example predictions")
    parser.add_argument("--no_base", action="store_true", help="do not evaluate the untuned base")
    parser.add_argument("--compare", default=None,
                        help="OUT,OUT,...: no runs; per-seed table and paired differences to --methods' first")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(args.compare.split(","), args.methods.split(",")))
        return 0
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
                          "full_lr": args.full_lr, "bind": args.bind, "base": args.base, "seed": args.seed,
                          "heldout_only": args.heldout_only}
    if "base" not in record and not args.no_base:
        t0 = time.time()
        res = evaluate_base(args, out)
        record["base"] = {"heldout": accuracies(res, held), "seen": {} if args.heldout_only else accuracies(res, seen),
                          "seconds": time.time() - t0}
        json.dump(record, open(path, "w"), indent=1)
    for method in args.methods.split(","):
        t0 = time.time()
        if args.heldout_only:
            scored = train_then_score(method, args, os.path.join(out, method), held)
        else:
            res = train_main.train_main(flags(method, args, os.path.join(out, method)))
            scored = {"heldout": accuracies(res, held), "seen": accuracies(res, seen)}
        from flan_jax.train.metrics_log import read_metrics
        rows = read_metrics(os.path.join(out, method))
        counts = {r["metric"]: r["value"] for r in rows if r["metric"] in ("trainable_parameters", "total_parameters")}
        losses = [r["value"] for r in rows if r["metric"] == "loss" and r.get("split") == "train"]
        record[method] = {**scored, "seconds": time.time() - t0, "final_train_loss": losses[-1] if losses else None,
                          **counts}
        json.dump(record, open(path, "w"), indent=1)
    print(table(record, held))
    return 0


def compare(outs: list, methods: list) -> str:
    """Per seed (one OUT each, the same eval examples) the held-out accuracy of each method and its paired difference
    to methods[0]; then the mean difference over seeds with its standard errors: over seeds (sd of the per-seed
    differences / sqrt(seeds): training randomness on these examples), over examples (sd over the examples of each
    example's difference averaged over seeds / sqrt(examples): which examples were drawn), and the two combined
    (root of the sum of squares), which the +- 2 SE interval uses."""
    import math
    ref, others = methods[0], methods[1:]
    records = [json.load(open(os.path.join(o, "results.json"))) for o in outs]
    mean = lambda xs: sum(xs) / len(xs)
    sd = lambda xs: math.sqrt(sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    flat = lambda r, m: [c for t in sorted(r[m]["correct"]) for c in r[m]["correct"][t]]
    lines = ["| seed | " + " | ".join(methods) + " | " + " | ".join(f"{m} - {ref}" for m in others) + " |",
             "|---" * (1 + len(methods) + len(others)) + "|"]
    for r in records:
        accs = {m: mean(flat(r, m)) for m in methods}
        lines.append(f"| {r['settings'].get('seed')} | " + " | ".join(f"{accs[m]:.4f}" for m in methods) + " | "
                     + " | ".join(f"{accs[m] - accs[ref]:+.4f}" for m in others) + " |")
    means = {m: mean([mean(flat(r, m)) for r in records]) for m in methods}
    lines.append("| mean | " + " | ".join(f"{means[m]:.4f}" for m in methods) + " | "
                 + " | ".join(f"{means[m] - means[ref]:+.4f}" for m in others) + " |")
    n = len(flat(records[0], ref))
    lines += ["", f"{len(records)} seeds x {n} held-out examples (" + ", ".join(sorted(records[0][ref]["correct"]))
              + "), the same examples for every seed and method"]
    for m in others:
        per_seed = [mean(flat(r, m)) - mean(flat(r, ref)) for r in records]
        per_example = [mean(ds) for ds in zip(*[[a - b for a, b in zip(flat(r, m), flat(r, ref))] for r in records])]
        disagree = sum(1 for r in records for a, b in zip(flat(r, m), flat(r, ref)) if a != b)
        d = mean(per_seed)
        se_seed, se_ex = sd(per_seed) / math.sqrt(len(per_seed)), sd(per_example) / math.sqrt(len(per_example))
        se = math.sqrt(se_seed ** 2 + se_ex ** 2)
        lines.append(f"- {m} - {ref}: mean {d:+.4f}, SE {se:.4f} (over seeds {se_seed:.4f}, over examples "
                     f"{se_ex:.4f}); mean +- 2 SE [{d - 2 * se:+.4f}, {d + 2 * se:+.4f}]; paired (seed, example) "
                     f"scored differently: {disagree} of {len(records) * n}")
    return "\n".join(lines)


def table(record: dict, held: list) -> str:
    mean = lambda d: sum(d.values()) / len(d) if d else float("nan")
    base_held = mean(record["base"]["heldout"]) if "base" in record else float("nan")
    full_gain = mean(record["full"]["heldout"]) - base_held if "full" in record else None
    lines = ["| method | trainable params | held-out acc (" + ", ".join(h.replace("_zs_opt", "") for h in held)
             + ") | gain | % of full FT gain | seen option acc | s |", "|---|---|---|---|---|---|---|"]
    if "base" in record:
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
