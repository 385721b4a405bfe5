"""`flan-jax data cache`: an Apache Beam job that renders and tokenizes every task of a mixture into the cache layout
of `flan_jax.pipeline.cache.format` (ArrayRecord shards, per-split stats.json, manifest.json).

One work item is one shard of one (task, split): its records (index modulo the shard count) are rendered, tokenized
(EOS appended as the seqio Task does), optionally truncated to `feature_lengths`, and written in index order. The
shards of a (task, split) are committed together: its stats.json is written only when every shard succeeded. A work
item that raises becomes a failure record, so one broken task leaves the others' splits committed.

A split whose committed fingerprint (`format.task_fingerprint`) matches and whose shard files all exist is skipped.
The same inputs give byte-identical shards and stats.

Beam workers are fresh processes under the multi-processing DirectRunner and remote runners: `modules` names the
registration modules each worker imports (in `DoFn.setup`) so it sees the same tasks as the launcher; environment
variables are inherited by local workers.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from typing import Mapping, Optional, Sequence

import numpy as np
import seqio

from flan_jax.data import registry
from flan_jax.pipeline import native
from flan_jax.pipeline.cache import format as fmt
from flan_jax.utils.user_modules import import_modules

EXAMPLES_PER_SHARD = 50_000
_CHUNK = 256
_REPORTS = ".build_reports"
LENGTH_KEYS = ("inputs", "targets")


# --- helpers shared by the launcher and the workers ------------------------------------------------------------------
def auto_num_shards(task: str, split: str) -> int:
    """ceil(declared examples / EXAMPLES_PER_SHARD), at least 1 (1 when the source declares no count)."""
    info = registry.task_info(task)
    count = registry.task_spec(info.base_task).num_examples(split)
    return max(1, math.ceil((count or 0) / EXAMPLES_PER_SHARD))


def length_bucket(length: int) -> str:
    """The power-of-two bucket of a token length, as its upper bound: 0 -> "0", 1 -> "1", 5 -> "8", 8 -> "8"."""
    return str(0 if length <= 0 else 1 << (int(length) - 1).bit_length())


def _error_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return (text.splitlines() or [type(error).__name__])[0][:300]


def _add_counts(total: dict, counts: Mapping) -> None:
    for key, value in counts.items():
        if isinstance(value, Mapping):
            _add_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value


def _skip_counts(task: str, split: str) -> dict:
    return dict(registry.data_error_counts(task=task, split=split))


def build_shard(root: str, task: str, split: str, shard: int, num_shards: int,
                feature_lengths: Optional[Mapping[str, int]] = None) -> dict:
    """Renders, tokenizes and writes one shard; returns its stats (see `_BuildShard`)."""
    info = registry.task_info(task)
    spec = registry.task_spec(info.base_task)
    features = seqio.get_mixture_or_task(task).output_features
    if info.variant.startswith("fs_"):
        registry.exemplar_pool(spec)  # built first, so its reads of the train split are not counted as this shard's
    lengths = dict(feature_lengths or {})
    stats = {"task": task, "split": split, "shard": shard, "num_shards": num_shards, "examples": 0,
             "tokens": {k: 0 for k in LENGTH_KEYS}, "truncated": {k: 0 for k in LENGTH_KEYS},
             "histogram": {k: {} for k in LENGTH_KEYS}}
    before = _skip_counts(task, split)

    def records():
        examples = registry.iter_examples(spec, info.variant, split, shard, num_shards, with_index=True)
        while True:
            chunk = []
            for pair in examples:
                chunk.append(pair)
                if len(chunk) == _CHUNK:
                    break
            if not chunk:
                return
            for (index, _), pair in zip(chunk, native.tokenize_examples(features, [e for _, e in chunk])):
                arrays = {}
                for key, ids in zip(LENGTH_KEYS, pair):
                    hist = stats["histogram"][key]
                    bucket = length_bucket(ids.size)
                    hist[bucket] = hist.get(bucket, 0) + 1
                    limit = lengths.get(key)
                    if limit is not None and ids.size > limit:
                        stats["truncated"][key] += 1
                        ids = ids[:limit]
                    stats["tokens"][key] += int(ids.size)
                    arrays[key] = ids
                stats["examples"] += 1
                yield fmt.encode_example(index, arrays["inputs"], arrays["targets"])

    path = fmt.shard_path(root, task, split, shard, num_shards)
    fmt.write_shard(path, records())
    after = _skip_counts(task, split)
    stats["skipped"] = {r: n - before.get(r, 0) for r, n in sorted(after.items()) if n > before.get(r, 0)}
    stats["file"] = os.path.basename(path)
    return stats


def commit_split(root: str, task: str, split: str, fingerprint: str, results: Sequence[dict]) -> dict:
    """Writes stats.json of a (task, split) whose shards all succeeded; else deletes its shards. Returns its report."""
    results = sorted(results, key=lambda r: r["shard"])
    failures = [r for r in results if "error" in r]
    num_shards = results[0]["num_shards"] if results else 0
    if failures or len(results) != num_shards or [r["shard"] for r in results] != list(range(num_shards)):
        for k in range(num_shards):
            path = fmt.shard_path(root, task, split, k, num_shards)
            for leftover in (path, path + ".tmp"):
                if os.path.exists(leftover):
                    os.remove(leftover)
        reason = (f"shard {failures[0]['shard']}/{num_shards}: {failures[0]['error']}" if failures
                  else f"{len(results)} of {num_shards} shard(s) reported")
        return {"task": task, "split": split, "status": "failed", "reason": reason}
    stats = {"fingerprint": fingerprint, "shards": [r["file"] for r in results],
             "shard_examples": [r["examples"] for r in results], "examples": 0,
             "tokens": {}, "truncated": {}, "skipped": {}, "histogram": {}}
    for r in results:
        stats["examples"] += r["examples"]
        for key in ("tokens", "truncated", "skipped", "histogram"):
            _add_counts(stats[key], r[key])
    stats["histogram"] = {k: dict(sorted(v.items(), key=lambda kv: int(kv[0])))
                          for k, v in stats["histogram"].items()}
    fmt.write_json_atomic(fmt.stats_path(root, task, split), stats)
    return {"task": task, "split": split, "status": "built", **_summary(stats)}


def _summary(stats: Mapping) -> dict:
    return {"fingerprint": stats["fingerprint"], "examples": stats["examples"], "shards": list(stats["shards"]),
            "tokens": dict(stats.get("tokens", {})), "truncated": dict(stats.get("truncated", {})),
            "skipped": dict(stats.get("skipped", {}))}


# --- Beam transforms -------------------------------------------------------------------------------------------------
def _transforms():
    import apache_beam as beam  # lazy: Beam is only needed by cache jobs

    class _Worker(beam.DoFn):
        def __init__(self, modules: Sequence[str]):
            self._modules = tuple(modules)

        def setup(self):
            import_modules(self._modules)

    class BuildShard(_Worker):
        """(task, split, shard, count) -> ((task, split), shard stats or {"shard", "num_shards", "error"})."""

        def __init__(self, modules, root, feature_lengths):
            super().__init__(modules)
            self._root, self._lengths = root, dict(feature_lengths or {})

        def process(self, item):
            task, split, shard, count = item
            try:
                result = build_shard(self._root, task, split, shard, count, self._lengths)
            except Exception as e:  # one bad task must not fail the job: reported per (task, split)
                result = {"task": task, "split": split, "shard": shard, "num_shards": count, "error": _error_line(e)}
            yield (task, split), result

    class CommitSplit(_Worker):
        """((task, split), [shard results]) -> writes stats.json (all shards succeeded) and the split's report."""

        def __init__(self, modules, root, fingerprints, report_dir):
            super().__init__(modules)
            self._root, self._fingerprints, self._report_dir = root, dict(fingerprints), report_dir

        def process(self, element):
            (task, split), results = element
            try:
                report = commit_split(self._root, task, split, self._fingerprints[f"{task}/{split}"], list(results))
            except Exception as e:
                report = {"task": task, "split": split, "status": "failed", "reason": _error_line(e)}
            fmt.write_json_atomic(os.path.join(self._report_dir, f"{task}.{split}.json"), report)
            yield report

    return beam, BuildShard, CommitSplit


def _pipeline_options(runner: str, num_workers: int, running_mode: str, pipeline_args: Sequence[str]):
    from apache_beam.options.pipeline_options import PipelineOptions  # lazy: Beam is only needed by cache jobs

    options = {"runner": runner}
    if runner in ("DirectRunner", "direct"):
        options.update(direct_num_workers=num_workers, direct_running_mode=running_mode)
    return PipelineOptions(flags=list(pipeline_args), **options)


# --- the job ---------------------------------------------------------------------------------------------------------
def _tasks_of(name: str) -> list[str]:
    try:
        seqio.get_mixture_or_task(name)
    except ValueError:
        if name in registry.list_base_tasks():
            return [t for t in registry.list_tasks() if registry.task_info(t).base_task == name]
        hint = registry.did_you_mean(name) or " (see `flan-jax data list`)"
        raise fmt.CacheError(f"no task or mixture named {name!r}{hint}") from None
    try:
        return sorted(native.registry_components(name, key="name"))
    except ValueError as e:
        raise fmt.CacheError(str(e)) from None


def _check_output(root: str) -> None:
    if "://" in root:
        raise fmt.CacheError(f"--output {root}: the cache is written with local file APIs; give a local or mounted "
                             "path (e.g. a gcsfuse mount of the bucket)")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise fmt.CacheError(f"--output {root}: cannot create it ({e.strerror or e})") from None
    if not os.path.isdir(root) or not os.access(root, os.W_OK | os.X_OK):
        raise fmt.CacheError(f"--output {root}: not a writable directory")


def _existing_manifest(root: str, expected: Mapping) -> Optional[dict]:
    if not os.path.exists(os.path.join(root, fmt.MANIFEST)):
        return None
    manifest = fmt.read_manifest(root)
    for field in ("format_version", "render_version", "feature_lengths"):
        if manifest.get(field) != expected[field]:
            raise fmt.CacheError(f"{os.path.join(root, fmt.MANIFEST)}: {field} is {manifest.get(field)!r}, this job "
                                 f"writes {expected[field]!r} (use another --output or rebuild the cache from scratch)")
    return manifest


def _is_cached(root: str, task: str, split: str, fingerprint: str) -> Optional[dict]:
    stats = fmt.read_split_stats(root, task, split)
    if not stats or stats.get("fingerprint") != fingerprint or not stats.get("shards"):
        return None
    directory = fmt.split_dir(root, task, split)
    return stats if all(os.path.isfile(os.path.join(directory, f)) for f in stats["shards"]) else None


def _uncommit(root: str, task: str, split: str) -> None:
    """Removes a split's stats.json and shards before it is rebuilt (a failed rebuild leaves it uncached)."""
    directory = fmt.split_dir(root, task, split)
    if not os.path.isdir(directory):
        return
    stats = fmt.stats_path(root, task, split)
    if os.path.exists(stats):
        os.remove(stats)
    prefix = f"{task}-{split}.array_record-"
    for name in os.listdir(directory):
        if name.startswith(prefix):
            os.remove(os.path.join(directory, name))


def build_cache(name: str, output: str, *, splits: Optional[Sequence[str]] = None, num_shards: Optional[int] = None,
                feature_lengths: Optional[Mapping[str, int]] = None, modules: Sequence[str] = (),
                runner: str = "DirectRunner", num_workers: int = 2, pipeline_args: Sequence[str] = (),
                running_mode: str = "multi_processing") -> dict:
    """Caches every task of mixture (or task) `name` under `output`; returns the job's report:

        {"output", "feature_lengths", "tasks": {task: {split: {"status": "built" | "skipped" | "failed", "reason",
         "examples", "shards" (file names), "tokens", "truncated", "skipped", "fingerprint"}}},
         "totals": {"built", "skipped", "failed", "examples", "tokens"}}

    Bad inputs (unknown name, no requested split, unwritable output, an existing manifest for other feature lengths
    or versions) raise `format.CacheError` before any work. Failures of single tasks are in the report.
    """
    fmt.require("apache_beam", "array_record")
    import_modules(modules)
    lengths = dict(feature_lengths) if feature_lengths else None
    if num_shards is not None and num_shards < 1:
        raise fmt.CacheError(f"--num_shards {num_shards}: must be at least 1")
    tasks = _tasks_of(name)
    wanted = {t: [s for s in (splits or registry.task_info(t).splits) if s in registry.task_info(t).splits]
              for t in tasks}
    if not any(wanted.values()):
        raise fmt.CacheError(f"--splits {','.join(splits or ())}: no task of {name!r} has any of them")
    _check_output(output)
    expected = fmt.expected_manifest([t for t in tasks if wanted[t]], lengths)
    manifest = _existing_manifest(output, expected)

    report = {"output": output, "feature_lengths": lengths, "tasks": {t: {} for t in tasks if wanted[t]}}
    items, fingerprints = [], {}
    for task in tasks:
        for split in wanted[task]:
            fingerprint = fmt.task_fingerprint(task, split, lengths)
            stats = _is_cached(output, task, split, fingerprint)
            if stats is not None:
                report["tasks"][task][split] = {"status": "skipped", "reason": "cached", **_summary(stats)}
                continue
            _uncommit(output, task, split)
            fingerprints[f"{task}/{split}"] = fingerprint
            count = num_shards or auto_num_shards(task, split)
            items.extend((task, split, k, count) for k in range(count))

    if items:
        report_dir = os.path.join(output, _REPORTS, uuid.uuid4().hex)
        os.makedirs(report_dir)
        try:
            _run_pipeline(items, output, lengths, fingerprints, report_dir, list(modules),
                          _pipeline_options(runner, num_workers, running_mode, pipeline_args))
            done = {}
            for file in sorted(os.listdir(report_dir)):
                if file.endswith(".json"):
                    result = _read_json(os.path.join(report_dir, file))
                    done[result["task"], result["split"]] = result
        finally:
            shutil.rmtree(os.path.join(output, _REPORTS), ignore_errors=True)
        for key in fingerprints:
            task, split = key.split("/", 1)
            result = done.get((task, split)) or {"status": "failed", "reason": "the pipeline reported nothing for it"}
            report["tasks"][task][split] = {k: v for k, v in result.items() if k not in ("task", "split")}

    _write_manifest(output, manifest, expected, report)
    report["totals"] = _totals(report)
    return report


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _run_pipeline(items, root, lengths, fingerprints, report_dir, modules, options) -> None:
    beam, BuildShard, CommitSplit = _transforms()
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline
             | "WorkItems" >> beam.Create(items)
             | "Spread" >> beam.Reshuffle()
             | "BuildShards" >> beam.ParDo(BuildShard(modules, root, lengths))
             | "GroupBySplit" >> beam.GroupByKey()
             | "CommitSplits" >> beam.ParDo(CommitSplit(modules, root, fingerprints, report_dir)))


def _write_manifest(root: str, manifest: Optional[dict], expected: Mapping, report: Mapping) -> None:
    entries = {t: dict(s) for t, s in (manifest or {}).get("tasks", {}).items()}
    for task, splits in report["tasks"].items():
        entry = entries.setdefault(task, {})
        for split, result in splits.items():
            if result["status"] == "failed":
                entry.pop(split, None)
            else:
                entry[split] = {"fingerprint": result["fingerprint"], "examples": result["examples"],
                                "shards": result["shards"]}
        if not entry:
            del entries[task]
    committed = [t for t, splits in report["tasks"].items() if any(r["status"] != "failed" for r in splits.values())]
    vocabularies = set((manifest or {}).get("vocabulary", ()))
    if committed:
        vocabularies |= set(fmt.expected_manifest(committed, expected["feature_lengths"])["vocabulary"])
    fmt.write_json_atomic(os.path.join(root, fmt.MANIFEST),
                          {**expected, "vocabulary": sorted(vocabularies), "tasks": entries})


def _totals(report: Mapping) -> dict:
    totals = {"built": 0, "skipped": 0, "failed": 0, "examples": 0, "tokens": 0}
    for splits in report["tasks"].values():
        for result in splits.values():
            totals[result["status"]] += 1
            if result["status"] == "built":
                totals["examples"] += result["examples"]
                totals["tokens"] += sum(result["tokens"].values())
    return totals
