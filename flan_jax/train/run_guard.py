"""What keeps a MODEL_DIR consistent across runs: one writer at a time, and no resume under another structure.

- `WriterLock`: MODEL_DIR/writer.lock names the host, pid and start time of the run writing there, and a heartbeat
  the holder renews every HEARTBEAT_S. A second run stops with a message naming the first; a lock left by a dead
  process on this host, or one whose heartbeat is older than STALE_AFTER_S (a host that died or was preempted: its
  pid cannot be checked from here), is taken over with a warning.
- `check_structure` / `write_run_config`: MODEL_DIR/run_config.json records the run's structural config (what its
  checkpoints' shapes and input position depend on) and its hyperparameters. A resume whose structure differs stops
  before anything is written, naming each differing key with both values; changed hyperparameters are logged.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import socket
import threading
from typing import Any, Optional

import jax
import seqio
from etils import epath

from flan_jax.pipeline import batches as data_lib

LOCK_FILE = "writer.lock"
HEARTBEAT_S = 60.0      # how often the holder renews writer.lock's heartbeat
STALE_AFTER_S = 600.0   # a lock not renewed for this long belongs to a run that is gone
RUN_CONFIG_FILE = "run_config.json"
RUN_CONFIG_VERSION = 1


class RunDirError(RuntimeError):
    """MODEL_DIR cannot be used by this run (another writer, or another structure); the message says why."""


def is_lead() -> bool:
    """Process 0 writes MODEL_DIR's run files; the others only read them."""
    return jax.process_index() == 0


# --- one writer ------------------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _age_s(stamp: Optional[str]) -> Optional[float]:
    try:
        then = datetime.datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return None
    return (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()


class WriterLock:
    """A context manager holding MODEL_DIR/writer.lock (by default process 0 of a run takes it)."""

    def __init__(self, model_dir: str, active: Optional[bool] = None, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        self.path = epath.Path(model_dir) / LOCK_FILE
        self.active = is_lead() if active is None else active
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        self._stop = threading.Event()

    def __enter__(self) -> "WriterLock":
        if self.active:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.release()

    def _holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # torn by a kill during its own write: nobody can hold it
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            holder = self._holder()
            if holder is None:
                continue  # released between our two looks
            if holder.get("pid") == os.getpid() and holder.get("host") == self.record["host"]:
                break  # this process already writes here (a second run in one interpreter)
            gone = self._why_gone(holder)
            if gone is None:
                raise RunDirError(
                        f"{self.path.parent} is being written by pid {holder.get('pid')} on {holder.get('host')} "
                        f"(started {holder.get('started')}, heartbeat {holder.get('heartbeat', 'none')}); wait for "
                        f"it, use another MODEL_DIR, or delete {self.path} if that run is gone")
            logging.warning("taking over %s: %s", self.path, gone)
            self._write()
            break
        threading.Thread(target=self._beat, name="writer.lock heartbeat", daemon=True).start()

    def _why_gone(self, holder: dict) -> Optional[str]:
        """Why the holder no longer writes here, or None while it may."""
        if not holder:
            return "it was unreadable"
        age = _age_s(holder.get("heartbeat") or holder.get("started"))
        if age is not None and age > self.stale_after_s:
            return f"pid {holder.get('pid')} on {holder.get('host')} has not renewed it for {age:.0f} s"
        if holder.get("host") == self.record["host"] and not _pid_alive(int(holder.get("pid", -1))):
            return f"pid {holder.get('pid')} on this host, started {holder.get('started')}, is gone"
        return None

    def _write(self) -> None:
        """The lock's record with a fresh heartbeat, replaced whole (a reader never sees half of it)."""
        tmp = f"{os.fspath(self.path)}.{self.record['pid']}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps({**self.record, "heartbeat": _now()}))
        os.replace(tmp, os.fspath(self.path))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self._holder()
            if holder and holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
                self._write()

    def _create(self) -> bool:
        """Creates the lock file if there is none (atomically on local disks)."""
        text = json.dumps({**self.record, "heartbeat": _now()})
        if "://" in os.fspath(self.path):  # object stores have no exclusive create: check, then write
            if self.path.exists():
                return False
            self.path.write_text(text)
            return True
        try:
            fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def release(self) -> None:
        self._stop.set()
        holder = self._holder()
        if holder and holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
            self.path.unlink()


# --- structure -------------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return str(value)


def _flat(prefix: str, value: Any) -> dict:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        out = {}
        for k, v in value.items():
            out.update(_flat(f"{prefix}.{k}" if prefix else k, v))
        return out
    return {prefix: _jsonable(value)}


def vocabulary_identity(vocab: seqio.Vocabulary) -> dict:
    """Size and a hash of what defines the vocabulary (SentencePiece: its model bytes)."""
    model = getattr(vocab, "sp_model", None)
    basis = model if isinstance(model, bytes) else f"{type(vocab).__name__}/{vocab.vocab_size}/{vocab.eos_id}".encode()
    return {"vocabulary.size": int(vocab.vocab_size), "vocabulary.sha256": hashlib.sha256(basis).hexdigest()[:16]}


def structure(cfg) -> dict:
    """What a run's checkpoints and input position are shaped by: resuming under another value cannot work."""
    out = {"model.class": type(cfg.model).__name__}
    out.update(_flat("model", cfg.model))  # includes the PEFT config (model.peft.*)
    out.update(vocabulary_identity(data_lib.targets_vocabulary(cfg.input)))
    opt = cfg.adafactor
    out.update({"optimizer.kind": "adafactor", "optimizer.factored": opt.factored,
                "optimizer.momentum": opt.beta1 is not None, "optimizer.min_dim_size_to_factor":
                opt.min_dim_size_to_factor})
    out["packing.task_feature_lengths"] = _jsonable(dict(cfg.input.task_feature_lengths))
    out["input.pipeline"] = cfg.input.pipeline
    return out


def hyperparameters(cfg) -> dict:
    """The rest of the TrainConfig (learning rate, steps, periods ...): free to change between runs."""
    flat = {}
    for field in dataclasses.fields(cfg):
        if field.name != "model":
            flat.update(_flat(field.name, getattr(cfg, field.name)))
    flat.pop("input.task_feature_lengths", None)
    flat.pop("input.pipeline", None)
    return flat


def _differences(old: dict, new: dict) -> list[str]:
    missing = "(absent)"
    return [f"{key}: {json.dumps(old.get(key, missing))} -> {json.dumps(new.get(key, missing))}"
            for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)]


def check_structure(model_dir: str, cfg) -> Optional[dict]:
    """Compares the run with MODEL_DIR/run_config.json (if any): raises RunDirError naming every structural
    difference; logs hyperparameter changes. Returns the record to write (None: nothing changed)."""
    record = {"version": RUN_CONFIG_VERSION, "structure": structure(cfg), "hyperparameters": hyperparameters(cfg)}
    path = epath.Path(model_dir) / RUN_CONFIG_FILE
    if not path.exists():
        return record
    try:
        stored = json.loads(path.read_text())
    except ValueError as e:
        raise RunDirError(f"{path} is unreadable ({e}); restore it or use another MODEL_DIR") from None
    if stored.get("version") != RUN_CONFIG_VERSION:
        raise RunDirError(f"{path} has version {stored.get('version')!r}; this flan_jax reads {RUN_CONFIG_VERSION}")
    changed = _differences(stored["structure"], record["structure"])
    if changed:
        raise RunDirError(f"{model_dir} holds a run of another structure; resuming it with this config cannot work "
                          "(use another MODEL_DIR, or the stored settings):\n  " + "\n  ".join(changed))
    hyper = _differences(stored.get("hyperparameters", {}), record["hyperparameters"])
    if hyper:
        logging.warning("resuming %s with changed hyperparameters:\n  %s", model_dir, "\n  ".join(hyper))
    return None if stored == record else record


def write_run_config(model_dir: str, record: Optional[dict]) -> None:
    if record is None:
        return
    path = epath.Path(model_dir) / RUN_CONFIG_FILE
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(path)
