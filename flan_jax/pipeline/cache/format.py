"""The on-disk layout of a preprocessed cache (`flan-jax data cache`), shared by its writer (Beam) and reader (Grain).

    DIR/manifest.json                                   what the cache is for (see `expected_manifest`) + its tasks
    DIR/<task>/<split>/<task>-<split>.array_record-00000-of-00004   ArrayRecord shards; shard k holds the records
                                                        whose index is k modulo the shard count, in index order
    DIR/<task>/<split>/stats.json                       written last: its presence commits the task's split

A record is one tokenized example: little-endian uint64 source record index, uint32 inputs length, uint32 targets
length, then the int32 input ids and the int32 target ids (EOS appended as the seqio Task appends it).

A (task, split) is identified by its fingerprint: the task's declaration (templates, variant, source description,
caps, seed), the vocabulary and the render version. A cache job skips a split whose committed fingerprint matches; a
reader refuses a cache whose manifest differs from what the run expects, naming the fields.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
from typing import Iterable, Mapping, Optional

import numpy as np
import seqio

from flan_jax.data import registry

FORMAT = "flan_jax.cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATS = "stats.json"
_HEADER = struct.Struct("<QII")


class CacheError(ValueError):
    """A cache that cannot be used: mismatched, missing or corrupt (the message names the field, file or task)."""


def require(*modules: str) -> None:
    """A CacheError naming the install command when a package of the 'cache' extra is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise CacheError(f"the preprocessed cache needs {', '.join(missing)}: pip install 'flan_jax[cache]' "
                         "(apache-beam, grain, array-record)")


# --- records ---------------------------------------------------------------------------------------------------------
def encode_example(index: int, inputs: np.ndarray, targets: np.ndarray) -> bytes:
    inputs, targets = np.asarray(inputs, "<i4"), np.asarray(targets, "<i4")
    return _HEADER.pack(index, inputs.size, targets.size) + inputs.tobytes() + targets.tobytes()


def decode_example(data: bytes) -> tuple[int, np.ndarray, np.ndarray]:
    """(record index, inputs, targets); a ValueError for bytes that are not one encoded example."""
    if len(data) < _HEADER.size:
        raise ValueError(f"record of {len(data)} bytes is shorter than its header")
    index, n_in, n_tg = _HEADER.unpack_from(data)
    if len(data) != _HEADER.size + 4 * (n_in + n_tg):
        raise ValueError(f"record of {len(data)} bytes does not hold {n_in} + {n_tg} token ids")
    ids = np.frombuffer(data, "<i4", offset=_HEADER.size).astype(np.int32)
    return index, ids[:n_in], ids[n_in:]


# --- paths -----------------------------------------------------------------------------------------------------------
def split_dir(root: str, task: str, split: str) -> str:
    return os.path.join(root, task, split)


def shard_path(root: str, task: str, split: str, index: int, count: int) -> str:
    return os.path.join(split_dir(root, task, split), f"{task}-{split}.array_record-{index:05d}-of-{count:05d}")


def stats_path(root: str, task: str, split: str) -> str:
    return os.path.join(split_dir(root, task, split), STATS)


# --- fingerprints ----------------------------------------------------------------------------------------------------
def vocabulary_fingerprint(vocabulary: seqio.Vocabulary) -> str:
    """Identifies the token ids a vocabulary produces: the SentencePiece model bytes, else its class, size and repr."""
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        return "spm:" + hashlib.sha256(vocabulary.sp_model).hexdigest()[:16]
    name = getattr(vocabulary, "name_or_path", None) or repr(vocabulary)
    return f"{type(vocabulary).__name__}:{name}:{vocabulary.vocab_size}"


def task_vocabularies(task: str) -> dict[str, str]:
    features = seqio.get_mixture_or_task(task).output_features
    return {key: vocabulary_fingerprint(features[key].vocabulary) for key in ("inputs", "targets")}


def task_fingerprint(task: str, split: str, feature_lengths: Optional[Mapping[str, int]] = None) -> str:
    """What a (task, split)'s cached records depend on; equal fingerprints mean the same records."""
    info = registry.task_info(task)
    spec = registry.task_spec(info.base_task)
    features = seqio.get_mixture_or_task(task).output_features
    parts = {
        "format": FORMAT_VERSION, "render_version": registry.RENDER_VERSION, "task": task, "split": split,
        "variant": info.variant, "source": spec.source.describe(), "num_examples": spec.num_examples(split),
        "templates": [repr(t) for t in registry.variant_templates(spec, info.variant)],
        "few_shot": repr(spec.few_shot), "record_policy": spec.record_policy, "seed": spec.seed,
        "options": [spec.options_field, spec.fixed_options, spec.options_style], "caps": dict(spec.max_examples),
        "vocabulary": task_vocabularies(task), "add_eos": {k: features[k].add_eos for k in ("inputs", "targets")},
        "feature_lengths": dict(feature_lengths) if feature_lengths else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:20]


# --- manifest --------------------------------------------------------------------------------------------------------
def expected_manifest(tasks: Iterable[str], feature_lengths: Optional[Mapping[str, int]] = None) -> dict:
    """The manifest fields a cache of `tasks` must carry to be read by a run (all but the per-task entries)."""
    vocabularies = {task_vocabularies(t)["inputs"] + " / " + task_vocabularies(t)["targets"] for t in tasks}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "render_version": registry.RENDER_VERSION,
            "vocabulary": sorted(vocabularies), "feature_lengths": dict(feature_lengths) if feature_lengths else None}


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CacheError(f"{root} is not a flan_jax cache: no {MANIFEST} (build it with `flan-jax data cache`)") \
            from None
    except (OSError, ValueError) as e:
        raise CacheError(f"{path} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a {FORMAT} manifest")
    return manifest


def write_json_atomic(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def check_manifest(manifest: Mapping, expected: Mapping, root: str) -> None:
    """Refuses a cache built for another vocabulary, feature lengths, render or format version: every differing
    field is named with the cache's value and the run's."""
    diffs = []
    for key, want in expected.items():
        have = manifest.get(key)
        if key == "vocabulary":  # a cache may hold more vocabularies than one run uses
            missing = sorted(set(want) - set(have or ()))
            if missing:
                diffs.append(f"vocabulary: cache has {have}, run needs {missing}")
        elif have != want:
            diffs.append(f"{key}: cache has {have!r}, run expects {want!r}")
    if diffs:
        raise CacheError(f"cache {root} was built for another configuration: " + "; ".join(diffs)
                         + " (rebuild it with `flan-jax data cache`)")


def read_split_stats(root: str, task: str, split: str) -> Optional[dict]:
    """The committed stats of a (task, split), or None when it is not (completely) cached."""
    try:
        with open(stats_path(root, task, split)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --- shards ----------------------------------------------------------------------------------------------------------
# group_size:1 puts each record in its own chunk: Grain reads records by index, so a record must be readable alone.
WRITER_OPTIONS = "group_size:1"


def write_shard(path: str, records: Iterable[bytes]) -> int:
    """Writes encoded records to one ArrayRecord shard (via a temporary name, so a shard that exists is complete);
    returns how many were written. The same records give the same bytes."""
    from array_record.python import array_record_module  # lazy: only cache jobs and cache readers need it

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
    count = 0
    try:
        for record in records:
            writer.write(record)
            count += 1
    finally:
        writer.close()
    os.replace(tmp, path)
    return count
