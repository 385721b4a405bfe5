"""`flan-jax eval-harness`: lm-evaluation-harness tasks on a flan_jax checkpoint (docs/eval-harness.md).

    flan-jax eval-harness --gin_file=RUN/config.gin --checkpoint=RUN/checkpoint_N --tasks t1,t2
        [--include_path DIR] [--skip_builtin_tasks] [--num_fewshot K] [--limit N] [--batch_size B] [--eos]
        [--max_input_len 1024] [--max_target_len 256] [--max_gen_toks 256] [--output FILE]

register() adds the model type "flan_jax" to lm-eval's registry; after it, lm_eval.simple_evaluate(model="flan_jax",
model_args="gin_file=RUN/config.gin,checkpoint=RUN/checkpoint_N") loads it. lm-eval's own command line, with
"flan_jax" registered (lm-eval 0.4 discovers no model plugins by itself):

    python -m flan_jax.cli.eval_harness run --model flan_jax --model_args gin_file=...,checkpoint=... --tasks ...

lm-eval is the optional extra `lmeval`: every import of it is inside a function.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
import time
from typing import Optional, Sequence

from flan_jax.cli import train as train_main
from flan_jax.evaluation.harness import HarnessOptions, HarnessScorer
from flan_jax.evaluation.inference import InferenceModel

PROG = "flan-jax eval-harness"
INSTALL = "pip install -c constraints.txt -e '.[lmeval]'"


def harness_options(batch_size=None, **fields) -> HarnessOptions:
    """HarnessOptions from lm-eval model_args; batch_size may come as lm-eval's "auto" (the default is used)."""
    unknown = set(fields) - {f.name for f in dataclasses.fields(HarnessOptions)}
    if unknown:
        raise ValueError(f"unknown model_args {sorted(unknown)}; known: gin_file, checkpoint, batch_size, "
                         + ", ".join(f.name for f in dataclasses.fields(HarnessOptions) if f.name != "batch_size"))
    if isinstance(batch_size, str) and batch_size.isdigit():
        batch_size = int(batch_size)
    if isinstance(batch_size, int) and not isinstance(batch_size, bool):
        fields["batch_size"] = batch_size
    return HarnessOptions(**fields)


def load_scorer(argv: Sequence[str], options: HarnessOptions = HarnessOptions()) -> HarnessScorer:
    """A HarnessScorer over the checkpoint that eval-style flags name (--gin_file=RUN/config.gin
    --checkpoint=RUN/checkpoint_N --gin.X=...; checkpoint default: MODEL_DIR's latest), loaded as `flan-jax eval`
    loads it."""
    flags, cfg = train_main.load_config(list(argv))
    params, _, vocab = train_main.restore_trained(cfg, flags.checkpoint)
    return HarnessScorer(InferenceModel(cfg.model, params, vocab), options)


@functools.lru_cache(maxsize=None)
def register():
    """lm-eval's LM class for flan_jax models, registered as "flan_jax" (once per process)."""
    import lm_eval.models  # lazy: lm-eval is an optional extra (imported first so its own model names stay listed)
    from lm_eval.api.model import LM  # lazy: lm-eval is an optional extra
    from lm_eval.api.registry import register_model  # lazy: lm-eval is an optional extra

    class FlanJaxLM(LM):
        """FlanJaxLM(gin_file=RUN/config.gin, checkpoint=RUN/checkpoint_N, **HarnessOptions fields), or
        FlanJaxLM(scorer=HarnessScorer(...)) for a model already in memory. device and max_batch_size, which lm-eval
        passes to every model, are not used: JAX places the model, and batches are sized by max_batch_tokens."""

        def __init__(self, gin_file=None, checkpoint=None, scorer=None, batch_size=None, max_batch_size=None,
                     device=None, **options):
            super().__init__()
            if scorer is None:
                if not gin_file:
                    raise ValueError("flan_jax model_args need gin_file=RUN/config.gin (and checkpoint=CKPT)")
                argv = [f"--gin_file={gin_file}"] + ([f"--checkpoint={checkpoint}"] if checkpoint else [])
                scorer = load_scorer(argv, harness_options(batch_size, **options))
            self.scorer = scorer

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._answer("loglikelihood", requests, self.scorer.loglikelihood)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._answer("loglikelihood_rolling", requests,
                                lambda args: self.scorer.loglikelihood_rolling([a[0] for a in args]))

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self._answer("generate_until", requests, self.scorer.generate_until)

        def _answer(self, kind, requests, fn):
            args = [r.args for r in requests]
            results = fn(args) if args else []
            for a, result in zip(args, results):   # lm-eval's --use_cache stores answers through this hook
                self.cache_hook.add_partial(kind, a, result)
            return results

    return register_model("flan_jax")(FlanJaxLM)


OPTION_HELP = {
    "batch_size": "prompts per batch",
    "max_input_len": "longer prompts keep their last tokens",
    "max_target_len": "loglikelihood_rolling's window: a longer text is scored in windows of this many tokens",
    "max_gen_toks": "generate_until's length when a task sets none",
    "max_batch_tokens": "a batch of wide prompts holds at most this many prompt tokens",
    "eos": "also score EOS after each loglikelihood continuation (rank classification's convention)",
}


def _parser():
    p = argparse.ArgumentParser(prog=PROG, description="lm-evaluation-harness tasks on a checkpoint; other flags "
                                "(--gin_file, --checkpoint, --gin.X=...) load the model as `flan-jax eval` does.")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    p.add_argument("--include_path", action="append", default=[], help="a folder of task YAMLs (repeatable)")
    p.add_argument("--skip_builtin_tasks", action="store_true",
                   help="index only --include_path (lm-eval's ~14k built-in task configs take ~15 s to index)")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="examples per task (below 1: that share of them)")
    p.add_argument("--output", default=None, help="write lm-eval's results (metrics and configs) as JSON")
    defaults = HarnessOptions()
    for field in dataclasses.fields(HarnessOptions):
        if isinstance(getattr(defaults, field.name), bool):
            p.add_argument(f"--{field.name}", action="store_true", help=OPTION_HELP[field.name])
        else:
            p.add_argument(f"--{field.name}", type=int, default=getattr(defaults, field.name),
                           help=OPTION_HELP[field.name] + " (default %(default)s)")
    return p


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else repr(e)}"


class UnknownTasks(ValueError):
    """Task names that neither lm-eval nor --include_path knows."""


def _load_tasks(args):
    """(TaskManager whose load() returns the tasks loaded here, task names); task errors raise here, before the
    checkpoint is read."""
    from lm_eval.tasks import TaskManager  # lazy: lm-eval is an optional extra
    manager = TaskManager(include_path=args.include_path or None, include_defaults=not args.skip_builtin_tasks)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown or not names:
        raise UnknownTasks(f"unknown task(s) {', '.join(map(repr, unknown)) or '(none given)'}: `lm-eval ls tasks` "
                          "lists the built-in ones; --include_path DIR adds a folder of task YAMLs")
    loaded = manager.load(names)
    manager.load = lambda *_args, **_kwargs: loaded   # simple_evaluate loads them again: reuse, datasets read once
    return manager, names


def _report(results: dict, seconds: float, scorer: HarnessScorer, output: Optional[str]) -> None:
    from lm_eval.utils import make_table  # lazy: lm-eval is an optional extra
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    n = sum(s.get("effective", s.get("original", 0)) for s in results.get("n-samples", {}).values())
    print(f"{n} examples in {seconds:.1f} s" + (f"; {scorer.truncated} prompts longer than --max_input_len were "
                                               "left-truncated" if scorer.truncated else ""))
    if output:
        with open(output, "w", encoding="utf-8") as f:
            json.dump({k: results[k] for k in ("results", "groups", "configs", "versions", "n-shot", "n-samples")
                       if k in results}, f, indent=1, default=str)
        print(f"results in {output}")


def _quiet() -> None:
    """lm-eval's per-stage notices and the datasets library's progress bars; warnings and errors still show."""
    import datasets  # lazy: installed with lm-eval, an optional extra
    datasets.disable_progress_bars()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, gin_argv = _parser().parse_known_args(sys.argv[1:] if argv is None else list(argv))
    try:
        import lm_eval  # lazy: lm-eval is an optional extra
    except ImportError:
        return _fail(f"lm-eval is not installed: {INSTALL}")
    try:
        options = HarnessOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(HarnessOptions)})
    except ValueError as e:
        return _fail(str(e))
    _quiet()
    try:
        manager, names = _load_tasks(args)
    except Exception as e:  # noqa: BLE001  (task configs and their data: YAML, dataset files, the hub)
        return _fail(str(e) if isinstance(e, UnknownTasks) else f"task error: {_one_line(e)}")
    try:
        scorer = load_scorer(gin_argv, options)
    except train_main.ConfigError as e:
        return _fail(f"config error: {e}")
    except FileNotFoundError as e:   # a checkpoint path that is not there
        return _fail(f"checkpoint error: {_one_line(e)}")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=register()(scorer=scorer), tasks=names, num_fewshot=args.num_fewshot,
                                      limit=limit, task_manager=manager, log_samples=False)
    _report(results, time.perf_counter() - start, scorer, args.output)
    return 0


def lm_eval_cli() -> None:
    """lm-eval's own command line (`lm_eval run ...` and its other subcommands) with "flan_jax" registered."""
    register()
    from lm_eval.__main__ import cli_evaluate  # lazy: lm-eval is an optional extra
    cli_evaluate()


if __name__ == "__main__":
    lm_eval_cli()
