"""Orbax checkpoints of the train state: keep the latest N, keep the best by a named eval metric, resume exactly.

A checkpoint holds params, optimizer state and step (`state`) plus JSON metadata (`meta`: step, seed, data position).
Orbax writes into a temporary directory and renames it when complete, so a run killed mid-write leaves no torn
`checkpoint_<step>/`; its temporary leftovers are ignored and cleaned up.
"""
from __future__ import annotations

import base64
import collections
import json
import logging
import os
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from etils import epath

from flan_jax.checkpoints import run_dir as trained

STEP_PREFIX = "checkpoint"
INPUT_STATE_DIR = "input_state"
INPUT_STATE_FORMAT = "flan_jax.input_state"
INPUT_STATE_VERSION = 1
UNREADABLE_DIR = "unreadable_checkpoints"
MIN_MODE_WORDS = ("loss", "ece", "perplexity")


def infer_best_mode(metric: str) -> str:
    """'min' for metrics where lower is better (loss, ece, perplexity in the metric's own name), else 'max'."""
    name = metric.rsplit("/", 1)[-1].lower()
    return "min" if any(word in name for word in MIN_MODE_WORDS) else "max"


def _manager(directory: str, max_to_keep: Optional[int], async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
            step_prefix=STEP_PREFIX, max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True)
    return ocp.CheckpointManager(_absolute(directory), options=options)


def _absolute(path: str) -> epath.Path:
    """Local paths absolute (orbax needs that); gs:// and other URLs as given."""
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def _one_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _sync(name: str) -> None:
    """A barrier across processes (a no-op with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Checkpointer:
    def __init__(self, model_dir: str, keep: Optional[int] = 3, async_save: bool = True,
                 best_metric: Optional[str] = None, best_mode: Optional[str] = None):
        self.model_dir = model_dir
        self.latest = _manager(model_dir, keep, async_save)
        if best_mode not in (None, "min", "max"):
            raise ValueError(f"BEST_MODE={best_mode!r}: use 'min' or 'max' (or leave it unset to infer it)")
        self.best_metric = best_metric
        self.best_mode = best_mode or (infer_best_mode(best_metric) if best_metric else "max")
        self._best_dir = str(_absolute(model_dir) / "best")
        self._best = None  # created on first use so runs without keep-best leave no empty folder

    # --- latest ------------------------------------------------------------------------------------------------------
    def latest_step(self) -> Optional[int]:
        return self.latest.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        if step in (self.latest.all_steps() or []):
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self.latest.save(step, args=args, force=True)

    def restore(self, abstract_state: Any, step: Optional[int] = None, directory: Optional[str] = None):
        """Restores (state, meta) into the shardings given by `abstract_state` (ShapeDtypeStructs with .sharding)."""
        mngr = self.latest if directory is None else _manager(directory, None, False)
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint_<step> under {mngr.directory}")
        restored = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def restore_latest(self, abstract_state: Any) -> Optional[tuple[Any, dict]]:
        """(state, meta) of the newest checkpoint that restores, laid out as `abstract_state`; None when there is none.

        Checkpoints that fail to restore (torn or corrupt files) are named with the reason and moved to
        MODEL_DIR/unreadable_checkpoints/ once an older one restores, so the run can save those steps again; nothing
        is deleted. When none restores nothing is moved (a changed model config fails every one): the error lists
        each."""
        failures = []
        for step in sorted(self.latest.all_steps() or [], reverse=True):
            try:
                restored = self.restore(abstract_state, step)
            except Exception as e:  # noqa: BLE001  (orbax raises many kinds for bad files)
                failures.append((step, _one_line(e)))
                logging.warning("skipped %s/%s_%d: it does not restore (%s)", self.model_dir, STEP_PREFIX, step,
                                failures[-1][1])
                continue
            if failures:
                self._set_aside([s for s, _ in failures])
            return restored
        if failures:
            raise RuntimeError(f"no checkpoint in {self.model_dir} restores: " + "; ".join(
                    f"{STEP_PREFIX}_{s}: {why}" for s, why in failures))
        return None

    def _set_aside(self, steps) -> None:
        """Moves unreadable checkpoint_<step> dirs out of the manager's sight (kept for inspection)."""
        if jax.process_index() == 0:
            aside = _absolute(self.model_dir) / UNREADABLE_DIR
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                name = f"{STEP_PREFIX}_{step}"
                target = aside / name
                n = 1
                while target.exists():
                    target, n = aside / f"{name}.{n}", n + 1
                (_absolute(self.model_dir) / name).rename(target)
                logging.warning("moved unreadable %s to %s (kept, not deleted)", name, target)
        _sync("flan_jax_set_aside_unreadable")
        self.latest.reload()

    # --- best --------------------------------------------------------------------------------------------------------
    def best_record(self) -> Optional[dict]:
        path = epath.Path(self.model_dir) / "best.json"
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def _better(self, value: float) -> bool:
        record = self.best_record()
        if record is None or record.get("metric") != self.best_metric:
            return True
        if record.get("mode", "max") != self.best_mode:
            logging.warning("best.json was kept with mode %s; BEST_MODE is now %s: the next evaluation replaces it",
                            record.get("mode", "max"), self.best_mode)
            return True
        return value > record["value"] if self.best_mode == "max" else value < record["value"]

    def maybe_save_best(self, step: int, state: Any, meta: dict, eval_values: dict) -> bool:
        """Keeps the checkpoint with the best `best_metric` (a key of eval_values) in MODEL_DIR/best/.

        best/ is not under the latest checkpoints' retention; its previous checkpoint is removed only after best.json
        names the new one, so best.json always points at a checkpoint that exists."""
        if not self.best_metric:
            return False
        if self.best_metric not in eval_values:
            raise KeyError(f"BEST_METRIC={self.best_metric!r} is not an eval metric; have {sorted(eval_values)}")
        value = float(eval_values[self.best_metric])
        if not self._better(value):
            return False
        if self._best is None:
            self._best = _manager(self._best_dir, None, False)
        if step not in (self._best.all_steps() or []):
            self._best.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
            self._best.wait_until_finished()
        if jax.process_index() == 0:
            tmp = epath.Path(self.model_dir) / "best.json.tmp"
            tmp.write_text(json.dumps({"metric": self.best_metric, "mode": self.best_mode, "value": value,
                                       "step": int(step),
                                       "path": os.path.join(self._best_dir, f"{STEP_PREFIX}_{step}")}))
            tmp.replace(epath.Path(self.model_dir) / "best.json")
        for old in self._best.all_steps():
            if old != step:
                self._best.delete(old)
        return True

    def wait(self) -> None:
        self.latest.wait_until_finished()

    def close(self) -> None:
        self.latest.wait_until_finished()
        self.latest.close()
        if self._best is not None:
            self._best.close()


# --- params alone ----------------------------------------------------------------------------------------------------
def restore_params(checkpoint_dir: str, abstract_params: Any) -> Any:
    """The `params` of a checkpoint_<step> dir laid out as `abstract_params` (ShapeDtypeStructs with shardings), its
    optimizer state unread. Raises ValueError naming a parameter the checkpoint lacks: orbax's partial restore would
    hand such a leaf back unfilled."""
    params = trained.restore_params(checkpoint_dir, abstract_params)
    missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
        raise ValueError(f"{checkpoint_dir} has no parameter {missing[0]} ({len(missing)} missing): it was trained "
                         "with another model config")
    return params


# --- input position ------------------------------------------------------------------------------------------------
# Each process saves its own input pipeline position beside the orbax step (MODEL_DIR/input_state/checkpoint_<step>/
# process_<i>.json): what it holds is host-local (record cursors, shuffle and packing buffers), not a global array.
# It is plain data in JSON with a format version (never pickle: a run directory from elsewhere must not run code).
def _input_state_path(model_dir: str, step: int, process_index: int) -> epath.Path:
    return epath.Path(model_dir) / INPUT_STATE_DIR / f"{STEP_PREFIX}_{step}" / f"process_{process_index}.json"


def to_plain(x: Any) -> Any:
    """JSON-able form of plain data: scalars, str, lists, tuples, dicts, deques, bytes and numpy arrays/scalars.
    Types outside that are refused (a position must not hold objects)."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (np.ndarray, np.generic)):
        a = np.asarray(x)
        if a.dtype == object:
            raise TypeError("input position holds a numpy object array")
        kind = "__nd__" if isinstance(x, np.ndarray) else "__np__"
        return {kind: [a.dtype.str, list(a.shape), base64.b64encode(a.tobytes()).decode()]}
    if isinstance(x, bytes):
        return {"__b__": base64.b64encode(x).decode()}
    if isinstance(x, tuple):
        return {"__t__": [to_plain(v) for v in x]}
    if isinstance(x, collections.deque):
        return {"__dq__": [to_plain(v) for v in x]}
    if isinstance(x, list):
        return [to_plain(v) for v in x]
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in x):
            return {k: to_plain(v) for k, v in x.items()}
        return {"__d__": [[to_plain(k), to_plain(v)] for k, v in x.items()]}
    raise TypeError(f"input position holds a {type(x).__name__}, not plain data")


def from_plain(x: Any) -> Any:
    """Inverse of to_plain."""
    if isinstance(x, list):
        return [from_plain(v) for v in x]
    if not isinstance(x, dict):
        return x
    if len(x) == 1:
        (tag, v), = x.items()
        if tag in ("__nd__", "__np__"):
            a = np.frombuffer(base64.b64decode(v[2]), dtype=np.dtype(v[0])).reshape(v[1]).copy()
            return a if tag == "__nd__" else a[()]
        if tag == "__b__":
            return base64.b64decode(v)
        if tag == "__t__":
            return tuple(from_plain(e) for e in v)
        if tag == "__dq__":
            return collections.deque(from_plain(e) for e in v)
        if tag == "__d__":
            return {from_plain(k): from_plain(e) for k, e in v}
    return {k: from_plain(v) for k, v in x.items()}


def save_input_state(model_dir: str, step: int, fingerprint: dict, state: Any, keep_steps=()) -> None:
    """Writes this process's input position for `step` (atomically) and removes those of steps not in keep_steps."""
    path = _input_state_path(model_dir, step, jax.process_index())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps({"format": INPUT_STATE_FORMAT, "version": INPUT_STATE_VERSION,
                               "fingerprint": to_plain(fingerprint), "state": to_plain(state)}))
    tmp.replace(path)
    keep = {f"{STEP_PREFIX}_{s}" for s in keep_steps} | {path.parent.name}
    for old in (epath.Path(model_dir) / INPUT_STATE_DIR).iterdir():
        stale = old / path.name
        if old.name not in keep and stale.exists():
            stale.unlink()


class InputStateError(ValueError):
    """A saved input position that is refused (unknown format or version, or unreadable)."""


def _read_input_state(path: epath.Path) -> dict:
    hint = f"delete {path.parent} to replay the input stream to this step instead"
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputStateError(f"input position {path} is corrupt ({_one_line(e)}); {hint}") from None
    if not isinstance(saved, dict) or saved.get("format") != INPUT_STATE_FORMAT:
        raise InputStateError(f"input position {path} is not a {INPUT_STATE_FORMAT} file; {hint}")
    if saved.get("version") != INPUT_STATE_VERSION:
        raise InputStateError(f"input position {path} has format version {saved.get('version')!r}; this flan_jax "
                              f"reads version {INPUT_STATE_VERSION}; {hint}")
    try:
        return {"fingerprint": from_plain(saved["fingerprint"]), "state": from_plain(saved["state"])}
    except (KeyError, TypeError, ValueError) as e:
        raise InputStateError(f"input position {path} is corrupt ({_one_line(e)}); {hint}") from None


def load_input_state(model_dir: str, step: int, fingerprint: dict) -> Optional[Any]:
    """This process's saved input position at `step`, or None (none saved, or saved under another input config).
    Raises InputStateError for a file it refuses (corrupt, unknown version, or a pickle of older runs)."""
    path = _input_state_path(model_dir, step, jax.process_index())
    legacy = path.parent / f"process_{jax.process_index()}.pkl"
    if not path.exists() and legacy.exists():
        raise InputStateError(f"input position {legacy} is a pickle, which is never loaded (it could run code); "
                              f"delete {path.parent} to replay the input stream to this step instead")
    if not path.exists():
        return None
    saved = _read_input_state(path)
    if saved["fingerprint"] != fingerprint:
        logging.warning("input position in %s was saved for %s, not %s: replaying the stream instead",
                        path, saved["fingerprint"], fingerprint)
        return None
    return saved["state"]
