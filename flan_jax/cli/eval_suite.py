"""`flan-jax eval-suite run|score`: the Flan-T5 paper's held-out benchmarks (BBH, MMLU, TyDiQA, MGSM).

    flan-jax eval-suite run --suite bbh --data_dir DIR --gin_file=... --checkpoint=CKPT [--mode direct|cot]
        [--shots K] [--calibrate] [--tasks a,b] [--batch_size 16] [--max_input_len 2048] [--max_decode_len 256]
        [--max_batch_tokens 8192]
    flan-jax eval-suite score --suite bbh --task date_understanding [--mode cot] --predictions F.jsonl

`run` writes per-task metrics to MODEL_DIR/metrics.jsonl (split "eval", task "<suite>/<task>" and "<suite>/mean"),
one predictions JSONL per task under MODEL_DIR/eval_suites/<suite>_<mode>/, and prints a table. `score` rescores a
predictions JSONL ("prediction" and "target" per line), or the BBH authors' published {"outputs": [...]} JSON, and
prints a JSON object whose "accuracy" is in percent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from flan_jax.evaluation import predictions as predictions_lib
from flan_jax.evaluation.suites import SUITES, suite_module
from flan_jax.cli import train as train_main
from flan_jax.evaluation.suites.runner import RunOptions, SuiteRunner
from flan_jax.train.metrics_log import MetricsWriter


def _run_parser():
    p = argparse.ArgumentParser(prog="flan-jax eval-suite run")
    p.add_argument("--suite", required=True, choices=SUITES)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--mode", default=None, choices=("direct", "cot"), help="default: the suite's (cot for mgsm)")
    p.add_argument("--shots", type=int, default=None, help="few-shot exemplars (default: the suite's)")
    p.add_argument("--calibrate", action="store_true", help="also report contextually calibrated rank metrics")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_input_len", type=int, default=2048)
    p.add_argument("--max_decode_len", type=int, default=256)
    p.add_argument("--max_batch_tokens", type=int, default=8192,
                   help="rows per batch = min(--batch_size, this // prompt width): long prompts in smaller batches")
    p.add_argument("--output_dir", default=None, help="predictions folder (default MODEL_DIR/eval_suites/...)")
    return p


def _write_predictions(folder: str, result) -> str:
    os.makedirs(folder, exist_ok=True)
    path = predictions_lib.file_in(folder, result.name.split("/", 1)[1])
    with open(path, "w", encoding="utf-8") as f:
        for rec in result.records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def _print_table(results, seconds: float) -> None:
    primary = lambda r: next(iter(r.metrics))
    print(f"{'task':48s} {'n':>5s} {'metric':>12s} {'value':>7s} {'ex/s':>7s}" + ("  trunc" if any(
        r.truncated for r in results) else ""))
    for r in results:
        extra = "  ".join(f"{k}={v:.2f}" for k, v in list(r.metrics.items())[1:])
        print(f"{r.name:48s} {len(r.records):5d} {primary(r):>12s} {r.metrics[primary(r)]:7.2f} "
              f"{len(r.records) / max(r.seconds, 1e-9):7.1f}" + (f"  {r.truncated}" if r.truncated else "")
              + (f"  {extra}" if extra else ""))
    n = sum(len(r.records) for r in results)
    tokens = sum(r.generated_tokens for r in results)
    line = f"{n} examples in {seconds:.1f} s: {n / max(seconds, 1e-9):.2f} examples/s"
    if tokens:
        line += f", {tokens} generated tokens: {tokens / max(seconds, 1e-9):.1f} tokens/s"
    print(line)
    dropped = sum(r.truncated for r in results)
    if dropped:
        print(f"{dropped} prompts longer than --max_input_len were left-truncated (kept the test question)")


def _mean(results) -> dict:
    metrics = [m for m in results[0].metrics if all(m in r.metrics for r in results)]
    return {m: sum(r.metrics[m] for r in results) / len(results) for m in metrics}


def run_main(argv: Sequence[str]) -> int:
    args, gin_argv = _run_parser().parse_known_args(argv)
    try:
        flags, cfg = train_main.load_config(gin_argv)
    except train_main.ConfigError as e:
        print(f"flan-jax eval-suite: config error: {e}", file=sys.stderr)
        return 2
    module = suite_module(args.suite)
    mode = args.mode or getattr(module, "DEFAULT_MODE", "direct")
    try:
        tasks = module.load_tasks(args.data_dir, mode=mode, shots=args.shots,
                                  tasks=args.tasks.split(",") if args.tasks else None)
    except (ValueError, OSError) as e:   # a missing file or a malformed row, named by the loader
        print(f"flan-jax eval-suite: {args.suite}: {e}", file=sys.stderr)
        return 2
    if args.calibrate and not any(t.kind == "rank" for t in tasks):
        print(f"flan-jax eval-suite: --calibrate applies to rank classification; {args.suite} --mode {mode} "
              "generates, so only raw metrics are reported", file=sys.stderr)
    folder = args.output_dir or os.path.join(cfg.model_dir, "eval_suites", f"{args.suite}_{mode}")
    try:   # before the checkpoint is read and any example runs
        predictions_lib.check_writable(folder, "--output_dir")
    except ValueError as e:
        print(f"flan-jax eval-suite: {e}", file=sys.stderr)
        return 2
    params, step, vocab = train_main.restore_trained(cfg, flags.checkpoint)
    try:
        options = RunOptions(args.batch_size, args.max_input_len, args.max_decode_len, args.calibrate,
                             args.max_batch_tokens)
    except ValueError as e:
        print(f"flan-jax eval-suite: {e}", file=sys.stderr)
        return 2
    runner = SuiteRunner(cfg.model, params, vocab, options)
    writer, results, start = MetricsWriter(cfg.model_dir, enable_tensorboard=False), [], time.perf_counter()
    for result in runner.run_many(tasks):
        results.append(result)
        writer.write(step, "eval", result.name, {**result.metrics, "num_examples": len(result.records)})
        _write_predictions(folder, result)
    writer.write(step, "eval", f"{args.suite}/mean", _mean(results))
    writer.close()
    _print_table(results, time.perf_counter() - start)
    print(f"{args.suite}/mean ({mode}): " + ", ".join(f"{k}={v:.2f}" for k, v in _mean(results).items()))
    print(f"predictions in {folder}; metrics in {os.path.join(cfg.model_dir, 'metrics.jsonl')}")
    return 0


def _prediction_rows(path: str):
    """(location, row) of a predictions file: JSONL, one object per line, or the BBH authors' published JSON
    (`{"canary": ..., "outputs": [{"input", "prediction", "target"}]}`)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("{") and '"outputs"' in text[:4096]:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("outputs"), list):
            return [(f"{path}: outputs[{i}]", row) for i, row in enumerate(data["outputs"])]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not a JSON object ({e.msg})") from None
    return rows


def score_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="flan-jax eval-suite score")
    p.add_argument("--suite", required=True, choices=SUITES)
    p.add_argument("--task", required=True)
    p.add_argument("--mode", default="cot", choices=("direct", "cot"))
    p.add_argument("--predictions", required=True)
    args = p.parse_args(argv)
    extract, score = suite_module(args.suite).scorer(args.task, args.mode)
    targets, answers = [], []
    for where, row in _prediction_rows(args.predictions):
        missing = {"prediction", "target"} - set(row)
        if missing:
            raise SystemExit(f"{where}: missing key(s) {sorted(missing)}")
        targets.append(row["target"] if isinstance(row["target"], str) else tuple(row["target"]))
        answers.append(extract(str(row["prediction"])))
    metrics = score(targets, answers)
    print(json.dumps({"suite": args.suite, "task": args.task, "mode": args.mode, "num_examples": len(targets),
                      **{k: metrics[k] for k in metrics if k != "accuracy"}, "accuracy": metrics.get(
                          "accuracy", next(iter(metrics.values())))}))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "score"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return (run_main if argv[0] == "run" else score_main)(argv[1:])
