"""Training input: a seqio mixture -> feature converter (packing) -> per-process batches of numpy arrays.

Each process reads the data shard its devices hold in the mesh (seqio ShardInfo by `partitioning.DataShard`) and
yields those rows of the global batch; the loop assembles global arrays. The stream is a deterministic function of
(mixture, seed). Resuming at step s continues from the input position saved with checkpoint s, without reading the
earlier examples again: the native pipeline's cursors and buffers, or on the seqio path the tf.data iterator's
checkpoint (train/seqio_input.py). Only a seqio pipeline that cannot be checkpointed (tasks from outside the
registry) is replayed past the s batches. All see exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Optional

import jax
import numpy as np
import seqio

from flan_jax.data import registry
from flan_jax.pipeline import native as native_pipeline
from flan_jax.pipeline import seqio_input
from flan_jax.pipeline.cache import format as cache_format, grain_input


@dataclasses.dataclass(frozen=True)
class InputConfig:
    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    global_batch_size: int
    seed: int = 0
    split: str = "train"
    shuffle: bool = True
    # 'per_process_shard': each process reads its own seqio shard (ShardInfo by process index) - scales to pods.
    # 'global_stream': each process reads the whole stream and keeps its rows - global batches independent of the
    #   number of processes (bitwise-comparable runs), at the cost of redundant input work per host.
    input_sharding: str = "per_process_shard"
    # 'seqio': seqio Tasks/Mixture + the feature converter over tf.data (the reference; what T5X runs).
    # 'native': flan_jax.pipeline.native, the same examples rendered, tokenized, mixed and packed in Python
    #   (registry tasks and PackedEncDecFeatureConverter only; several times faster on CPU).
    #   'cache': flan_jax.pipeline.cache.grain_input, the tokenized examples of a preprocessed cache (`flan-jax data
    #   cache`) at `cache_dir`, read, mixed and packed with Grain.
    pipeline: str = "seqio"
    cache_dir: Optional[str] = None
    # 'cache' only: Grain worker processes that read, pack and batch (0: all in the training process).
    workers: int = 0


def resolve_mixture_or_task(name: str, key: str = "MIXTURE_OR_TASK_NAME"):
    """The seqio Task or Mixture, or a clear error naming it (checked before any training work)."""
    if not isinstance(name, str):
        raise ValueError(f"{key}={name!r}: expected a task or mixture name")
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        hint = registry.did_you_mean(name) or " (did you import flan_jax.tasks or pass --module?)"
        raise ValueError(f"{key}={name!r} is not a registered seqio Task or Mixture{hint}") from None


def targets_vocabulary(cfg: InputConfig):
    """The vocabulary of the training mixture's targets (what the model's vocab axis indexes)."""
    return resolve_mixture_or_task(cfg.mixture_or_task_name).output_features["targets"].vocabulary


def local_batch_size(global_batch_size: int, shard=None) -> int:
    count = jax.process_count() if shard is None else shard.count
    if global_batch_size % count:
        raise ValueError(f"BATCH_SIZE={global_batch_size} is not divisible by the {count} data shards")
    return global_batch_size // count


INPUT_SHARDINGS = ("per_process_shard", "global_stream")


class HostBatches:
    """Iterator of this process's batches; `state()` is its input position (with the registry's counts of records
    skipped so far in its split), or None (a replayed seqio pipeline)."""

    def __init__(self, source, rows: Optional[slice] = None, split: str = "train"):
        self._source, self._rows, self._split = source, rows, split

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._source)
        return batch if self._rows is None else {k: v[self._rows] for k, v in batch.items()}

    def state(self) -> Optional[dict]:
        if not hasattr(self._source, "state"):
            return None
        return {"position": self._source.state(), "data_errors": registry.data_error_counts(split=self._split)}


def train_batches(cfg: InputConfig, feature_converter: seqio.FeatureConverter, skip_batches: int = 0,
                  shard=None, input_state: Optional[dict] = None) -> HostBatches:
    """This process's rows of each global batch, as numpy arrays.

    shard: this process's `partitioning.DataShard` (from the mesh); None means one shard per process. Processes that
    share a shard (a model-parallel group spanning hosts) read the same seqio shard and so feed identical rows.
    input_state: a saved `state()`; it continues there (no skipping) and `skip_batches` is ignored.
    """
    if cfg.input_sharding not in INPUT_SHARDINGS:
        raise ValueError(f"INPUT_SHARDING={cfg.input_sharding!r}: expected one of {INPUT_SHARDINGS}")
    index, count = (jax.process_index(), jax.process_count()) if shard is None else (shard.index, shard.count)
    per_shard = cfg.input_sharding == "per_process_shard" and count > 1
    if input_state is not None:  # the records before the position are not read again: neither are their errors
        registry.restore_data_error_counts(input_state["data_errors"], cfg.split)
        input_state = input_state["position"]
    local = local_batch_size(cfg.global_batch_size, shard)
    # Our packer truncates (or drops) over-length examples itself and counts them; seqio's trimming is silent.
    counts_truncation = hasattr(feature_converter, "stats")
    batch_size = local if per_shard else cfg.global_batch_size
    if cfg.pipeline == "cache":
        batches = grain_input.cache_batches(
                cfg.cache_dir, cfg.mixture_or_task_name, cfg.task_feature_lengths, batch_size, feature_converter,
                split=cfg.split, seed=cfg.seed, shuffle=cfg.shuffle, shard_index=index if per_shard else 0,
                num_shards=count if per_shard else 1, state=input_state, worker_count=cfg.workers)
        if input_state is None:
            for _ in range(skip_batches):
                next(batches)
    elif cfg.pipeline == "native":
        batches = native_pipeline.packed_batches(
                cfg.mixture_or_task_name, cfg.task_feature_lengths, batch_size, feature_converter, split=cfg.split,
                seed=cfg.seed, shuffle=cfg.shuffle, shard_index=index if per_shard else 0,
                num_shards=count if per_shard else 1, state=input_state)
        if input_state is None:
            for _ in range(skip_batches):
                next(batches)
    else:
        batches = seqio_input.seqio_batches(
                cfg.mixture_or_task_name, cfg.task_feature_lengths, batch_size, feature_converter, split=cfg.split,
                shuffle=cfg.shuffle, seed=cfg.seed,
                shard_info=seqio.ShardInfo(index=index, num_shards=count) if per_shard else None,
                trim_output_features=not counts_truncation, skip_batches=skip_batches, state=input_state)
    rows = slice(index * local, (index + 1) * local) if not per_shard and count > 1 else None
    return HostBatches(batches, rows, cfg.split)


def input_fingerprint(cfg: InputConfig, shard) -> dict:
    """What a saved input position depends on; a position saved under a different one is not reused."""
    identity = {"mixture": cfg.mixture_or_task_name, "lengths": dict(cfg.task_feature_lengths),
                "batch": cfg.global_batch_size, "seed": cfg.seed, "split": cfg.split, "shuffle": cfg.shuffle,
                "sharding": cfg.input_sharding, "pipeline": cfg.pipeline,
                "shard": None if shard is None else [shard.index, shard.count], "state_format": 3}
    if cfg.pipeline == "cache":  # only then: the positions saved by the other pipelines keep their fingerprint
        identity["cache"], identity["workers"] = _cache_identity(cfg), cfg.workers
    return identity


def _cache_identity(cfg: InputConfig) -> Optional[dict]:
    """The cache a position was taken in: its directory and the fingerprints of the split's tasks (a rebuilt task
    gives another stream)."""
    if cfg.pipeline != "cache":
        return None
    try:
        entries = cache_format.read_manifest(cfg.cache_dir).get("tasks") or {}
    except cache_format.CacheError:
        entries = {}
    return {"dir": cfg.cache_dir, "tasks": {t: (e.get(cfg.split) or {}).get("fingerprint")
                                            for t, e in sorted(entries.items())}}


def pipeline_counters(feature_converter) -> dict:
    """Cumulative packing figures (examples in, truncated, dropped, fill) and per-task skipped-record counts.

    Counters run slightly ahead of training (tf.data prefetches): they describe the data produced so far.
    """
    out = {}
    stats = getattr(feature_converter, "stats", None)
    if stats is not None:
        d = stats.as_dict()
        for key in ("examples_in", "truncated", "dropped_overlength", "dropped_empty", "rows_out"):
            if key in d:
                out[f"packing_{key}"] = float(d[key])
    return out


def data_errors_by_task(split: Optional[str] = None) -> dict:
    """{task: {"data_errors": total, "data_errors/<reason>": n}} from the registry's skip-and-count policy, of the
    records of `split` (all splits if None). Restored with the input position on resume."""
    result = {}
    for task, reasons in registry.data_error_counts(split=split).items():
        values = {"data_errors": float(sum(reasons.values()))}
        values.update({f"data_errors/{r}": float(n) for r, n in reasons.items()})
        result[task] = values
    return result


def batch_statistics(batch: Mapping[str, np.ndarray]) -> dict:
    """Padding and packing figures of one host batch (cheap numpy on the host, no device sync)."""
    out = {}
    if "encoder_input_tokens" in batch:
        out["encoder_nonpadding_fraction"] = float(np.mean(batch["encoder_input_tokens"] != 0))
    out["decoder_nonpadding_fraction"] = float(np.mean(batch["decoder_target_tokens"] != 0))
    if "decoder_loss_weights" in batch:
        out["loss_fraction"] = float(np.mean(batch["decoder_loss_weights"] > 0))
    seg = batch.get("decoder_segment_ids")
    if seg is not None:
        out["segments_per_row"] = float(np.mean(np.max(seg, axis=-1)))
    return out


def token_counts(batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(real input tokens, real target tokens) in a host batch."""
    enc = int(np.sum(batch["encoder_input_tokens"] != 0)) if "encoder_input_tokens" in batch else 0
    return enc, int(np.sum(batch["decoder_target_tokens"] != 0))
