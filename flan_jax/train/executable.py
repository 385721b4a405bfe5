"""A compiled train step saved to disk, so a launch on the slice loads it instead of compiling.

`flan-jax compile --save_executable DIR` writes the executable the TPU compiler produced for a topology
(`train_step.bin`, from jax's serialize_executable) and a manifest (`train_step.json`). A run with
`train.compiled_step_dir = DIR` traces and lowers its own step (seconds), and loads the saved executable only when
the manifest matches that run: the same lowered program (a hash of its text), compile effort, device kind and count,
and the same jax / jaxlib / libtpu. Anything else is named on one line and the step is compiled as usual: a stale
file can cost time, never a wrong step.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from typing import Any, Callable, Optional

from jax.experimental import serialize_executable

FORMAT = 1
BINARY, MANIFEST = "train_step.bin", "train_step.json"


def versions() -> dict:
    """The packages an executable is bound to: it runs only where they are the same."""
    found = {}
    for name in ("jax", "jaxlib", "libtpu"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def fingerprint(lowered) -> str:
    """sha256 of the lowered program's text: the step, its shapes, shardings and compile options."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def manifest(lowered, devices: list, compile_effort: float, **extra) -> dict:
    return {"format": FORMAT, "fingerprint": fingerprint(lowered), "device_kind": devices[0].device_kind,
            "num_devices": len(devices), "compile_effort": float(compile_effort), "versions": versions(), **extra}


def save(compiled, lowered, devices: list, directory: str, compile_effort: float, **extra) -> str:
    """Writes DIR/train_step.bin and DIR/train_step.json; returns the manifest's path."""
    payload, _, _ = serialize_executable.serialize(compiled)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, BINARY), "wb") as f:
        f.write(payload)
    path = os.path.join(directory, MANIFEST)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest(lowered, devices, compile_effort, **extra), f, indent=2)
        f.write("\n")
    return path


def _differences(saved: dict, wanted: dict) -> list:
    keys = ("format", "versions", "device_kind", "num_devices", "compile_effort", "fingerprint")
    return [f"{k}: saved {saved.get(k)!r}, this run {wanted[k]!r}" for k in keys if saved.get(k) != wanted[k]]


def load(jitted, abstract_args: tuple, devices: list, directory: str, compile_effort: float,
         log: Callable[[str], None] = print) -> Optional[Any]:
    """The saved executable of `jitted` lowered on `abstract_args`, or None (with one logged line saying why) when
    DIR holds none or one made for another program, device or jax."""
    key = f"train.compiled_step_dir={directory!r}"
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            saved = json.load(f)
        with open(os.path.join(directory, BINARY), "rb") as f:
            payload = f.read()
    except (OSError, ValueError) as e:
        log(f"{key}: no usable saved step ({e.__class__.__name__}: {e}); compiling the step")
        return None
    lowered = jitted.lower(*abstract_args)
    differences = _differences(saved, manifest(lowered, devices, compile_effort))
    if differences:
        log(f"{key}: saved step not used ({'; '.join(differences)}); compiling the step")
        return None
    compiled = serialize_executable.deserialize_and_load(payload, lowered.in_tree, lowered.out_tree)
    log(f"{key}: loaded the saved compiled step")
    return compiled
