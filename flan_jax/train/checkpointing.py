"""Orbax checkpoints of the train state: keep the latest N, keep the best by a named eval metric, resume exactly.

A checkpoint holds params, optimizer state and step (`state`) plus JSON metadata (`meta`: step, seed, data position).
Orbax writes into a temporary directory and renames it when complete, so a run killed mid-write leaves no torn
`checkpoint_<step>/`; its temporary leftovers are ignored and cleaned up.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from flan_jax.checkpoints import run_dir as trained

STEP_PREFIX = "checkpoint"
INPUT_STATE_DIR = "input_state"


def _manager(directory: str, max_to_keep: Optional[int], async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
            step_prefix=STEP_PREFIX, max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True)
    return ocp.CheckpointManager(_absolute(directory), options=options)


def _absolute(path: str) -> epath.Path:
    """Local paths absolute (orbax needs that); gs:// and other URLs as given."""
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


class Checkpointer:
    def __init__(self, model_dir: str, keep: Optional[int] = 3, async_save: bool = True,
                              best_metric: Optional[str] = None, best_mode: str = "max"):
        self.model_dir = model_dir
        self.latest = _manager(model_dir, keep, async_save)
        self.best_metric, self.best_mode = best_metric, best_mode
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
        """(state, meta) of the latest checkpoint laid out as `abstract_state`, or None when there is none yet."""
        if self.latest_step() is None:
            return None
        return self.restore(abstract_state)

    # --- best --------------------------------------------------------------------------------------------------------
    def best_record(self) -> Optional[dict]:
        path = epath.Path(self.model_dir) / "best.json"
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def maybe_save_best(self, step: int, state: Any, meta: dict, eval_values: dict) -> bool:
        """Keeps the checkpoint with the best `best_metric` (a key of eval_values) in MODEL_DIR/best/."""
        if not self.best_metric:
            return False
        if self.best_metric not in eval_values:
            raise KeyError(f"BEST_METRIC={self.best_metric!r} is not an eval metric; have {sorted(eval_values)}")
        value = float(eval_values[self.best_metric])
        record = self.best_record()
        better = record is None or (value > record["value"] if self.best_mode == "max" else value < record["value"])
        if not better:
            return False
        if self._best is None:
            self._best = _manager(self._best_dir, 1, False)
        self._best.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._best.wait_until_finished()
        if jax.process_index() == 0:
            tmp = epath.Path(self.model_dir) / "best.json.tmp"
            tmp.write_text(json.dumps({"metric": self.best_metric, "value": value, "step": int(step),
                                       "path": os.path.join(self._best_dir, f"{STEP_PREFIX}_{step}")}))
            tmp.replace(epath.Path(self.model_dir) / "best.json")
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
# process_<i>.pkl): what it holds is host-local (record cursors, shuffle and packing buffers), not a global array.
def _input_state_path(model_dir: str, step: int, process_index: int) -> epath.Path:
    return epath.Path(model_dir) / INPUT_STATE_DIR / f"{STEP_PREFIX}_{step}" / f"process_{process_index}.pkl"


def save_input_state(model_dir: str, step: int, fingerprint: dict, state: Any, keep_steps=()) -> None:
    """Writes this process's input position for `step` (atomically) and removes those of steps not in keep_steps."""
    path = _input_state_path(model_dir, step, jax.process_index())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(pickle.dumps({"fingerprint": fingerprint, "state": state}, protocol=pickle.HIGHEST_PROTOCOL))
    tmp.replace(path)
    keep = {f"{STEP_PREFIX}_{s}" for s in keep_steps} | {path.parent.name}
    for old in (epath.Path(model_dir) / INPUT_STATE_DIR).iterdir():
        stale = old / f"process_{jax.process_index()}.pkl"
        if old.name not in keep and stale.exists():
            stale.unlink()


def load_input_state(model_dir: str, step: int, fingerprint: dict) -> Optional[Any]:
    """This process's saved input position at `step`, or None (none saved, or saved under another input config)."""
    path = _input_state_path(model_dir, step, jax.process_index())
    if not path.exists():
        return None
    saved = pickle.loads(path.read_bytes())
    if saved["fingerprint"] != fingerprint:
        logging.warning("input position in %s was saved for %s, not %s: replaying the stream instead",
                        path, saved["fingerprint"], fingerprint)
        return None
    return saved["state"]
