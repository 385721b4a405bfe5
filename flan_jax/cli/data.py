"""`flan-jax data ...`: inspect registered tasks and mixtures.

  flan-jax data list [--collection NAME]                      task name, cluster, number of templates (TSV)
  flan-jax data show NAME [-n N] [--split S] [--mock]         rendered input/target pairs
  flan-jax data stats NAME [-n N] [--split S] [--mock] [--feature_lengths inputs=256,targets=64]
                                                              per-task rate and share, token-length percentiles,
                                                              examples that would be truncated, skipped records
  flan-jax data cache NAME --output DIR [...] [-- BEAM_OPTIONS]   tokenized ArrayRecord cache (flan_jax.cli.data_cache)
`show` and `stats` take a seqio task or mixture name, or a base task name (`my_task`, `t0_<dataset>_<template>`,
`cot_<name>`: all its variants). `show` ends each task with what it skipped and why ("# TASK [split]: shown 3; skipped
2 record(s) of those read: 1 invalid_json (first at FILE:LINE); 1 missing_field:label") and exits with status 1 when
a task renders no record at all.
`--module M` (repeatable; a module name or a .py path) imports more registration modules besides `tasks`.
Collections t0 / niv2 / cot / flan2022 register on demand: `--collection NAME` (list) or a task/mixture name with
that prefix (show, stats), with `--promptsource-dir DIR` [--t0-data-dir DIR], `--niv2-dir DIR`, `--cot-dir DIR`
(either CoT layout, see tasks/cot.py); `data list --collection t0` also prints the templates it left out
("# SKIPPED" lines), and with `--check N [--mock]` the tasks that render none of N records. `--mock` wraps the run in
`tfds.testing.mock_data` so TFDS-backed tasks render random schema-correct records offline.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import sys
from typing import Sequence, TextIO

import numpy as np
import seqio

from flan_jax.cli import data_cache
from flan_jax.data import mixing, registry
from flan_jax.data.sources import TfdsSource
from flan_jax.tasks import cot, flan2022, niv2, t0
from flan_jax.utils.user_modules import import_modules

PERCENTILES = (50, 90, 99)


def _parse_feature_lengths(text: str) -> dict[str, int]:
    lengths = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in ("inputs", "targets") or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--feature_lengths: expected inputs=N,targets=M, got {item!r}")
        lengths[key.strip()] = int(value)
    return lengths


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flan-jax data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--module", action="append", default=[], help="extra registration module to import")
    _add_collection_arguments(common)
    p_list = sub.add_parser("list", parents=[common], help="list registered tasks")
    p_list.add_argument("--collection", default=None)
    p_list.add_argument("--check", type=int, default=0, metavar="N",
                        help="t0: render N records per task and list tasks that render none")
    p_list.add_argument("--mock", action="store_true", help="with --check: use tfds.testing.mock_data")
    for name, help_text in (("show", "print rendered examples"), ("stats", "rates, lengths and truncation")):
        p = sub.add_parser(name, parents=[common], help=help_text)
        p.add_argument("name", help="seqio task or mixture name")
        p.add_argument("-n", "--num_examples", type=int, default=3 if name == "show" else 500,
                       help="examples per task")
        p.add_argument("--split", default=None, help="default: train (validation for eval mixtures)")
        p.add_argument("--mock", action="store_true", help="use tfds.testing.mock_data for TFDS sources")
    sub.choices["stats"].add_argument("--feature_lengths", type=_parse_feature_lengths,
                                      default={"inputs": 1024, "targets": 256})
    data_cache.add_parser(sub, [common])
    return parser


def _import_registrations(modules: Sequence[str]) -> None:

    importlib.import_module("flan_jax.tasks")
    try:
        import_modules(modules)
    except ValueError as e:
        raise SystemExit(f"flan-jax data: {e}") from None


def _tasks_and_rates(name: str) -> list[tuple[str, float]]:

    try:
        seqio.get_mixture_or_task(name)
    except ValueError:
        variants = _variants_of_base_task(name)  # `data list` prints base names for t0, niv2 and cot
        if variants:
            return [(variant, 1.0) for variant in variants]
        hint = registry.did_you_mean(name) or " (see `flan-jax data list`)"
        raise SystemExit(f"flan-jax data: no task or mixture named {name!r}{hint}") from None
    return sorted(mixing.mixture_rates(name).items())


def _variants_of_base_task(name: str) -> list[str]:

    if name not in registry.list_base_tasks():
        return []
    return [task for task in registry.list_tasks() if registry.task_info(task).base_task == name]


def _default_split(name: str, task: str) -> str:

    splits = seqio.get_mixture_or_task(task).splits
    preferred = "validation" if "eval" in name else "train"
    return preferred if preferred in splits else splits[0]


def _mock_context(enabled: bool, num_examples: int):
    if not enabled:
        return contextlib.nullcontext()
    import tensorflow_datasets as tfds  # lazy: TFDS is heavy; importing a registration must stay cheap

    return tfds.testing.mock_data(num_examples=max(num_examples, 10), policy=tfds.testing.MockPolicy.USE_CODE)


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def cmd_list(args, out: TextIO) -> int:

    if args.collection in COLLECTION_MODULES:
        return _list_collection(args, out)
    names = registry.list_tasks(args.collection)
    if not names:
        print(f"no tasks registered{' in collection ' + repr(args.collection) if args.collection else ''}",
              file=sys.stderr)
        return 1
    for name in names:
        info = registry.task_info(name)
        print(f"{name}\t{info.cluster}\t{info.num_templates}", file=out)
    return 0


def cmd_show(args, out: TextIO) -> int:

    empty = []
    with _mock_context(args.mock, args.num_examples):
        for task_name, _ in _tasks_and_rates(args.name):
            split = args.split or _default_split(args.name, task_name)
            before = _skip_snapshot(task_name)
            ds = seqio.get_mixture_or_task(task_name).get_dataset(
                sequence_length=None, split=split, shuffle=False, use_cached=False)
            shown = 0
            for i, ex in enumerate(ds.take(args.num_examples).as_numpy_iterator()):
                template = ex.get("template_index", -1)
                print(f"=== {task_name} [{split} #{i}, template {template}] ===", file=out)
                print(f"INPUT:\n{_text(ex['inputs_pretokenized'])}", file=out)
                print(f"TARGET: {_text(ex['targets_pretokenized'])}", file=out)
                options = [_text(o) for o in ex.get("options", [])]
                if options:
                    print(f"SCORED OPTIONS: {options}", file=out)
                print(file=out)
                shown += 1
            skipped = _skips_since(task_name, before)
            print(f"# {task_name} [{split}]: shown {shown}; {_describe_skips(skipped)}", file=out)
            if not shown:
                empty.append(f"{task_name} [{split}]: no record rendered: " + (
                    f"all {skipped['dropped']} record(s) read were dropped "
                    f"({_describe_skips(skipped).split(': ', 1)[-1]})" if skipped["dropped"] else "the split is empty"))
    for line in empty:
        print(f"flan-jax data show: {line}", file=sys.stderr)
    return 1 if empty else 0


# ----------------------------------------------------------------------------------------------------------------
# Skipped records: the registry counts them per seqio task (`record_is_none` when the source gave None); sources
# that know why (a JSONL line that is not JSON, a promptsource template the sandbox refused) count their reasons.
# ----------------------------------------------------------------------------------------------------------------

def _source_chain(task_name: str) -> list:

    try:
        source = registry.task_spec(registry.task_info(task_name).base_task).source
    except KeyError:
        return []  # a plain seqio task: nothing counted
    chain = []
    while source is not None and len(chain) < 8:
        chain.append(source)
        source = getattr(source, "base", None)
    return chain


def _source_counts(task_name: str) -> tuple[dict, dict]:
    counts, where = {}, {}
    for source in _source_chain(task_name):
        for method in ("render_error_counts", "read_error_counts"):
            for reason, n in (getattr(source, method, None) or dict)().items():
                counts[reason] = counts.get(reason, 0) + n
        where.update((getattr(source, "first_read_errors", None) or dict)())
    return counts, where


def _skip_snapshot(task_name: str) -> tuple[dict, dict]:
    """Counters before reading a task (few-shot exemplar pools are built first so their reads are not counted)."""

    try:
        info = registry.task_info(task_name)
        if info.variant.startswith("fs_"):
            registry.exemplar_pool(registry.task_spec(info.base_task))
    except KeyError:
        pass
    return registry.data_error_counts(task_name), _source_counts(task_name)[0]


def _skips_since(task_name: str, before: tuple[dict, dict]) -> dict:
    """{"dropped": n, "reasons": {reason: n}, "where": {reason: "path:line"}} of the records skipped since `before`.

    A source's own reasons replace the registry's `record_is_none` when they account for exactly those records
    (a source read for another split, as a held-out split reads the whole train file, may count more)."""

    registry_before, source_before = before
    reasons = {r: n - registry_before.get(r, 0) for r, n in registry.data_error_counts(task_name).items()}
    reasons = {r: n for r, n in reasons.items() if n > 0}
    source_now, where = _source_counts(task_name)
    source = {r: n - source_before.get(r, 0) for r, n in source_now.items() if n > source_before.get(r, 0)}
    dropped = sum(reasons.values())
    if source and sum(source.values()) == reasons.get("record_is_none", 0):
        reasons.pop("record_is_none")
        reasons.update(source)
    elif source and reasons.get("record_is_none"):  # no registry drop: the source counted another split's lines
        reasons.update({f"source:{r}": n for r, n in source.items()})
    return {"dropped": dropped, "reasons": reasons, "where": {r: w for r, w in where.items() if r in source}}


def _describe_skips(skipped: dict) -> str:
    if not skipped["dropped"] and not skipped["reasons"]:
        return "skipped none"
    parts = []
    for reason, n in sorted(skipped["reasons"].items(), key=lambda item: (-item[1], item[0])):
        where = skipped["where"].get(reason.removeprefix("source:"))
        parts.append(f"{n} {reason}" + (f" (first at {where})" if where else ""))
    return f"skipped {skipped['dropped']} record(s) of those read: " + "; ".join(parts)


def _length_stats(lengths: np.ndarray, limit: int) -> str:
    if lengths.size == 0:
        return "-"
    pcts = "/".join(str(int(np.percentile(lengths, p))) for p in PERCENTILES)
    return f"{pcts}/{int(lengths.max())} trunc={int((lengths > limit).sum())}"


def _scan_lengths(task_name: str, split: str, num_examples: int) -> dict:
    """{"inputs": [arrays], "targets": [arrays]} of the token lengths of a task's first examples."""
    import tensorflow as tf  # lazy: TensorFlow takes seconds to import; only the input pipeline needs it

    ds = seqio.get_mixture_or_task(task_name).get_dataset(sequence_length=None, split=split, shuffle=False,
                                                         use_cached=False)
    ds = ds.take(num_examples).map(lambda ex: {"inputs": tf.size(ex["inputs"]), "targets": tf.size(ex["targets"])})
    lengths = {"inputs": [], "targets": []}
    for batch in ds.batch(1024).as_numpy_iterator():
        for key in lengths:
            lengths[key].append(batch[key])
    return lengths


def _unprepared_tfds(task_name: str) -> str | None:
    """Why a task's TFDS data is absent (its dataset not prepared in the TFDS data dir), or None."""
    import tensorflow_datasets as tfds  # lazy: TFDS is heavy; only commands that read data need it

    for source in _source_chain(task_name):
        if isinstance(source, TfdsSource):
            try:
                prepared = tfds.builder(source.name, data_dir=source.data_dir).is_prepared()
            except Exception as e:  # noqa: BLE001 - an unknown or broken builder is as absent as an unprepared one
                return f"TFDS {source.name}: {_one_line(e)}"
            if not prepared:
                return (f"TFDS {source.name} is not prepared in {source.data_dir or tfds.core.constants.DATA_DIR} "
                        "(`tfds build` it, or set TFDS_DATA_DIR)")
    return None


def _one_line(error: BaseException) -> str:
    """The error's own first line; for a tf.data error, the Python error it wraps."""
    text = str(error).strip().splitlines()
    wrapped = [line.strip() for line in text if re.match(r"\s*\w+(Error|Exception): ", line)]
    return (wrapped[-1] if wrapped else f"{type(error).__name__}: {text[0] if text else ''}")[:200]


def _group_by_reason(failures: dict) -> dict:
    groups: dict[str, list] = {}
    for task, reason in failures.items():
        groups.setdefault(reason, []).append(task)
    return groups


def cmd_stats(args, out: TextIO) -> int:
    task_rates = _tasks_and_rates(args.name)
    total_rate = sum(rate for _, rate in task_rates) or 1.0
    limits = {"inputs": 1024, "targets": 256, **args.feature_lengths}
    print(f"# {args.name}: {len(task_rates)} task(s); lengths in tokens incl. EOS as "
          f"p{'/p'.join(map(str, PERCENTILES))}/max; trunc = examples longer than "
          f"inputs={limits['inputs']} / targets={limits['targets']} (of n scanned)", file=out)
    print("task\trate\tshare\tn\tinputs\ttargets", file=out)
    totals = {"n": 0, "inputs": 0, "targets": 0}
    with _mock_context(args.mock, args.num_examples):
        skipped, unreadable = {}, {}
        for task_name, rate in task_rates:
            split = args.split or _default_split(args.name, task_name)
            missing = None if args.mock else _unprepared_tfds(task_name)
            if missing:
                unreadable[task_name] = missing
                print(f"{task_name}\t{rate:g}\t{rate / total_rate:.4f}\t0\tMISSING: {missing}", file=out)
                continue
            try:
                before = _skip_snapshot(task_name)
                lengths = _scan_lengths(task_name, split, args.num_examples)
            except Exception as e:  # noqa: BLE001 - any failing source (unprepared TFDS, unreadable file) is reported
                unreadable[task_name] = _one_line(e)
                print(f"{task_name}\t{rate:g}\t{rate / total_rate:.4f}\t0\tUNREADABLE: {unreadable[task_name]}",
                      file=out)
                continue
            arrays = {k: np.concatenate(v) if v else np.zeros([0], np.int32) for k, v in lengths.items()}
            totals["n"] += arrays["inputs"].size
            for key in ("inputs", "targets"):
                totals[key] += int((arrays[key] > limits[key]).sum())
            print(f"{task_name}\t{rate:g}\t{rate / total_rate:.4f}\t{arrays['inputs'].size}\t"
                  f"{_length_stats(arrays['inputs'], limits['inputs'])}\t"
                  f"{_length_stats(arrays['targets'], limits['targets'])}", file=out)
            skips = _skips_since(task_name, before)
            if skips["dropped"]:
                skipped[task_name] = skips["reasons"]
    print(f"# total scanned {totals['n']}: truncated inputs {totals['inputs']}, targets {totals['targets']}", file=out)
    print(f"# skipped malformed records: {skipped or 'none'}", file=out)
    print(f"# present: {len(task_rates) - len(unreadable)} task(s) read; unreadable: {len(unreadable)}", file=out)
    for reason, tasks in _group_by_reason(unreadable).items():
        print(f"#   {len(tasks)} task(s), e.g. {tasks[0]}: {reason}", file=out)
    if args.name.startswith("flan2022"):
        print(f"# flan2022 missing collections: {flan2022.describe_missing()}", file=out)
    return 0


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "data":
        argv = argv[1:]
    argv, pipeline_args = data_cache.split_pipeline_args(argv)
    args = _build_parser().parse_args(argv)
    args.pipeline_args = pipeline_args
    _import_registrations(args.module)
    _register_collections(args)
    command = {"list": cmd_list, "show": cmd_show, "stats": cmd_stats, "cache": data_cache.cmd_cache}[args.command]
    return command(args, out or sys.stdout)


# ----------------------------------------------------------------------------------------------------------------
# Collections registered on demand (t0, niv2, cot, flan2022): options, registration and listing
# ----------------------------------------------------------------------------------------------------------------

COLLECTION_MODULES = {"t0": "flan_jax.tasks.t0", "t0sf": "flan_jax.tasks.t0", "niv2": "flan_jax.tasks.niv2", "niv2tk": "flan_jax.tasks.niv2",
                      "cot": "flan_jax.tasks.cot", "flan2022": "flan_jax.tasks.flan2022"}


def _add_collection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--promptsource-dir", default=None, help="promptsource templates folder (T0 / P3)")
    parser.add_argument("--t0-data-dir", default=None, help="folder of <dataset>/<split>.jsonl HF exports for T0")
    parser.add_argument("--niv2-dir", default=None, help="local clone of Super-NaturalInstructions")
    parser.add_argument("--cot-dir", default=None,
                        help="folder of CoT files: <dataset>/<split>.{tsv,jsonl}, or FLAN's <name>_train.tsv")


def _wanted_collection(args) -> str | None:
    name = getattr(args, "collection", None) or getattr(args, "name", None) or ""
    for collection in sorted(COLLECTION_MODULES, key=len, reverse=True):
        if name == collection or name.startswith(collection + "_"):
            return "t0" if collection == "t0sf" else "niv2" if collection == "niv2tk" else collection
    return None


def _register_collections(args) -> None:
    """Registers the collection a command names (and any whose folder is given); cheap when none applies."""
    wanted = _wanted_collection(args)
    ps_dir, niv2_dir, cot_dir = args.promptsource_dir, args.niv2_dir, args.cot_dir
    if not (ps_dir or niv2_dir or cot_dir) and _already_registered(getattr(args, "name", None)):
        return  # registered by --module or an environment variable on import
    if wanted == "t0" and not ps_dir:
        raise SystemExit("flan-jax data: the t0 collection needs --promptsource-dir DIR (a promptsource templates "
                         "folder) or $FLAN_JAX_PROMPTSOURCE_DIR")
    if wanted == "niv2" and not niv2_dir:
        raise SystemExit("flan-jax data: the niv2 collection needs --niv2-dir DIR (a natural-instructions clone) "
                         "or $FLAN_JAX_NIV2_DIR")
    if ps_dir and (wanted in ("t0", "flan2022") or not wanted):
        t0.register(ps_dir, args.t0_data_dir)
    if niv2_dir and (wanted in ("niv2", "flan2022") or not wanted):
        niv2.register(niv2_dir)
    if wanted == "cot" or cot_dir:
        cot.register(cot_dir)
    if wanted == "flan2022":
        flan2022.register()


def _already_registered(name: str | None) -> bool:

    return bool(name) and (name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names()
                           or name in registry.list_base_tasks())


def _t0_render_check(num_records: int, mock: bool, out: TextIO) -> None:

    failing = 0
    with _mock_context(mock, num_records):
        for dataset, names in t0.LAST_DIAGNOSTICS.registered.items():
            first = registry.task_spec(names[0]).source
            split = "validation" if "validation" in first.splits else first.splits[0]
            raws = first.base.first_records(split, num_records)
            for name in names:
                source = registry.task_spec(name).source
                rendered = [source.render(split, i, raw) for i, raw in raws]
                usable = [r for r in rendered if r is not None and ("options" not in r or r["target"] in r["options"])]
                if not usable:
                    failing += 1
                    reasons = dict(source.render_error_counts())
                    bad_targets = sum(1 for r in rendered if r is not None) - len(usable)
                    if bad_targets:
                        reasons["target_not_in_options"] = bad_targets
                    print(f"# RENDERS_NONE\t{dataset}\t{name}\t{split}: 0 of {len(raws)} records: {reasons}",
                          file=out)
    print(f"# render check: {failing} task(s) rendered none of {num_records} records", file=out)


def _list_collection(args, out: TextIO) -> int:

    collection = _wanted_collection(args)
    if collection == "t0":
        diagnostics = registry.collection_registration("t0")
        for dataset, names in diagnostics.registered.items():
            for name in names:
                print(f"{name}\t{dataset}\t1", file=out)
        for line in diagnostics.lines():  # one line each: a YAML error message spans several
            print("# " + " ".join(part.strip() for part in line.splitlines() if part.strip()), file=out)
        print(f"# t0: {sum(map(len, diagnostics.registered.values()))} template task(s) from "
              f"{len(diagnostics.registered)} dataset(s); {len(diagnostics.skipped)} template(s) or dataset(s) "
              f"skipped", file=out)
        if args.check:
            _t0_render_check(args.check, args.mock, out)
        return 0
    if collection == "niv2":
        result = registry.collection_registration("niv2")
        for task, (flan_name, tk_name) in result.base_tasks.items():
            n = registry.task_spec(flan_name).source.num_examples("train")
            print(f"{flan_name}\t{task}\t{n}", file=out)
            print(f"{tk_name}\t{task}\t{n}", file=out)
        for task, reason in result.missing:
            print(f"# SKIPPED\t{task}\t{reason}", file=out)
        return 0
    if collection == "cot":
        for name in registry.list_base_tasks("cot"):
            spec = registry.task_spec(name)
            print(f"{name}\t{spec.source.describe()}\t{len(spec.cot_templates)}", file=out)
        return 0
    for task, rate in sorted(mixing.mixture_rates(flan2022.MIXTURE).items()):
        print(f"{task}\t{registry.task_info(task).collection}\t{rate:.6g}", file=out)
    print(f"# flan2022 missing collections: {flan2022.describe_missing()}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
