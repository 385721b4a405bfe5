"""Records from a Hugging Face `datasets` dataset: local data files, a `save_to_disk` directory, or a hub name.

    DatasetsSource("json", data_files={"train": "train.jsonl", "validation": "dev.jsonl"})   # also csv, parquet
    DatasetsSource("/data/my_saved_dataset")              # a directory written by Dataset(Dict).save_to_disk
    DatasetsSource("super_glue", "rte")                   # hub name + config: needs the network (or a warm cache)

The dataset is loaded when the source is created (Arrow files, memory-mapped; `load_dataset` converts data files
into its cache once), so split sizes come from the dataset itself and a missing file or split fails there, in one
line naming it. Records are the dataset's rows as plain dicts, in row order; `map_fn` maps them to template fields
(None marks a record malformed). Arrow gives every row every column of the file's schema: a key missing from some
JSON lines is None in those rows, where `files.JsonlSource` would leave it out.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Callable, Iterable, Iterator, Mapping

from flan_jax.data.sources import Record, RecordSource

MapFn = Callable[[dict], Record | None]
_READ_BATCH = 256  # rows per Arrow read: one column conversion per batch instead of per row


# Builders that read local data files: their `data_files` are checked here, hub-relative ones are not.
_FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")
# What load_dataset raises for a missing file or dataset, no network, or a bad argument: re-raised as one line.
_LOAD_ERRORS = (FileNotFoundError, ConnectionError, ValueError)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_saved_dataset(path: str) -> bool:
    """A directory written by save_to_disk (a DatasetDict's or a single Dataset's)."""
    return any(os.path.isfile(os.path.join(path, marker)) for marker in ("dataset_dict.json", "state.json"))


def _looks_local(path: str) -> bool:
    return os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)


def _file_patterns(data_files: Any) -> dict[str, tuple[str, ...]]:
    """{split: paths or glob patterns} of a `data_files` argument (str, list, or {split: str | list})."""
    if isinstance(data_files, Mapping):
        return {split: (v,) if isinstance(v, str) else tuple(v) for split, v in data_files.items()}
    return {"train": (data_files,) if isinstance(data_files, str) else tuple(data_files)}


class DatasetsSource(RecordSource):
    """A `datasets` dataset's splits as records.

    Args:
      path: a builder name ("json", "csv", "parquet", "text") with `data_files`; a `save_to_disk` directory; a
        directory of data files; or a hub dataset name.
      name: the hub dataset's config ("rte" of "super_glue").
      data_files: for a builder name: a path, a list, or {split: path(s)}; globs allowed.
      split_map: our split name -> the dataset's split name (default: every split under its own name; a saved
        single Dataset is "train").
      map_fn: row dict -> template fields, or None for a malformed record.
      load_kwargs: passed to `datasets.load_dataset` (cache_dir, revision, data_dir, ...).
    """

    def __init__(self, path: str, name: str | None = None, *, data_files: Any = None,
                 split_map: Mapping[str, str] | None = None, map_fn: MapFn | None = None, **load_kwargs):
        self.path = os.path.expanduser(path) if path.startswith("~") else path
        self.config, self.map_fn = name, map_fn
        self._label = f"{path}:{name}" if name else path
        self._check_files(data_files)
        loaded = self._load(data_files, load_kwargs)
        available = dict(loaded) if hasattr(loaded, "keys") else {"train": loaded}
        split_map = dict(split_map or {split: split for split in available})
        for split, theirs in split_map.items():
            if theirs not in available:
                raise ValueError(f"{self.describe()}: split {split!r}: the dataset has no split {theirs!r} "
                                 f"(it has {sorted(available)})")
        self._datasets = {split: available[theirs] for split, theirs in split_map.items()}
        super().__init__(tuple(split_map), {split: len(ds) for split, ds in self._datasets.items()})

    def _check_files(self, data_files: Any) -> None:
        """Fails on a missing local file before `datasets` does (its error names no split)."""
        if data_files is None and _looks_local(self.path) and not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.describe()}: no directory {self.path!r}")
        if data_files is None or not (self.path in _FILE_BUILDERS or _looks_local(self.path)):
            return
        base = self.path if os.path.isdir(self.path) else ""  # a data directory's files are relative to it
        for split, patterns in _file_patterns(data_files).items():
            for pattern in patterns:
                if "://" not in pattern and not glob.glob(os.path.join(base, os.path.expanduser(pattern))):
                    raise FileNotFoundError(f"{self.describe()}: split {split!r}: no file {pattern!r}")

    def _load(self, data_files: Any, load_kwargs: Mapping[str, Any]):
        import datasets  # lazy: `datasets` (with pyarrow, pandas) takes seconds to import; only this source needs it

        try:
            if data_files is None and os.path.isdir(self.path) and _is_saved_dataset(self.path):
                return datasets.load_from_disk(self.path)
            return datasets.load_dataset(self.path, self.config, data_files=data_files, **load_kwargs)
        except _LOAD_ERRORS as e:  # e.g. a file gone since the check, the hub unreachable offline, a bad config
            kind = next(k for k in _LOAD_ERRORS if isinstance(e, k))
            raise kind(f"{self.describe()}: {_first_line(e)}") from None

    def dataset(self, split: str):
        """The `datasets.Dataset` behind one of our splits."""
        self.check_split(split)
        return self._datasets[split]

    def _rows(self, ds) -> Iterator[dict]:
        for batch in ds.iter(batch_size=_READ_BATCH):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns)):
                row = dict(zip(columns, values))
                yield self.map_fn(row) if self.map_fn is not None else row

    def _iter_split(self, split: str) -> Iterable[Record]:
        return self._rows(self._datasets[split])

    def records(self, split: str, shard_index: int = 0, num_shards: int = 1) -> Iterator[tuple[int, Record]]:
        """As RecordSource.records, but a shard reads only its own rows (Arrow selects them by index)."""
        self.check_split(split)
        ds = self._datasets[split]
        if num_shards > 1:
            ds = ds.select(range(shard_index, len(ds), num_shards))
        for offset, record in enumerate(self._rows(ds)):
            yield shard_index + offset * num_shards, record

    def describe(self) -> str:
        return f"DatasetsSource({self._label})"
