"""Process environment for fast XLA:CPU steps: glibc malloc keeps large buffers and backs them with huge pages.

XLA:CPU allocates a step's temporaries afresh on every run. glibc serves blocks over 32 MiB with mmap and unmaps them
on free, so each step faults its whole working set in again, 4 KiB at a time: about 1M page faults and a fifth of a
T5 1.1 small step on the 2-core CI machine (docs/benchmarks.md). The tunables below keep freed memory in the heap for
reuse and let it use transparent huge pages. glibc reads them only at process start, so the command-line entry points
re-execute themselves once with them set. GLIBC_TUNABLES values the user set win over ours.

Only when JAX will run on the CPU: on GPU and TPU hosts the host heap is not the step's working set, and never
returning freed memory to the kernel would only grow the process. The backend is decided without initializing JAX
(which would defeat the restart), by the rule of jax._src.xla_bridge: with JAX_PLATFORMS (or the older
JAX_PLATFORM_NAME) set, the first platform listed is the backend; otherwise an installed accelerator plugin
(a `jax_plugins` entry point or module, or libtpu) wins if its device nodes exist (/dev/nvidiactl, /dev/kfd,
/dev/accel0 or /dev/vfio), and an unknown plugin is assumed to win; else it is the CPU.
FLAN_JAX_MALLOC_TUNING=0 turns the tunables off, =1 applies them whatever the backend.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from typing import Callable, Iterable, Mapping, Optional, Sequence

MALLOC_TUNABLES = (
    "glibc.malloc.hugetlb=1",                    # madvise(MADV_HUGEPAGE) on the heap: 2 MiB faults, not 4 KiB
    "glibc.malloc.mmap_max=0",                   # big blocks from the heap too, so freeing them keeps the pages
    "glibc.malloc.trim_threshold=68719476736",   # never give the heap top back to the kernel between steps
)
OPT_OUT_VARIABLE = "FLAN_JAX_MALLOC_TUNING"
# Device nodes whose presence means an installed plugin of that kind will find its accelerator.
ACCELERATOR_DEVICE_NODES = {"cuda": ("/dev/nvidiactl",), "rocm": ("/dev/kfd",), "tpu": ("/dev/accel0", "/dev/vfio")}


def installed_jax_plugins() -> set:
    """Names of the installed JAX PJRT plugins (entry points, jax_plugins modules, libtpu), found without importing."""
    names = {ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")}
    try:
        spec = importlib.util.find_spec("jax_plugins")  # a namespace package: nothing of it runs
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        names |= {m.name for m in pkgutil.iter_modules(list(spec.submodule_search_locations))}
    if importlib.util.find_spec("libtpu") is not None:
        names.add("libtpu")
    return names


def jax_backend_is_cpu(environ: Mapping[str, str], plugins: Optional[Iterable[str]] = None,
                       path_exists: Callable[[str], bool] = os.path.exists) -> bool:
    """Whether JAX's default backend will be the CPU (the rule in this module's docstring); initializes nothing."""
    requested = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""
    platforms = [p.strip().lower() for p in requested.split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    for plugin in installed_jax_plugins() if plugins is None else plugins:
        kind = next((k for k in ACCELERATOR_DEVICE_NODES if k in plugin.lower()), None)
        if kind is None or any(path_exists(node) for node in ACCELERATOR_DEVICE_NODES[kind]):
            return False
    return True


def skip_absent_accelerators(environ=os.environ, **backend_probe) -> None:
    """JAX_PLATFORMS=cpu when JAX would end on the CPU anyway (no installed plugin finds its device nodes), so an
    installed but idle plugin (libtpu of the `tpu` extra on a laptop) is not started: it would only print warnings
    about the TPU it cannot find. A JAX_PLATFORMS the user set is left alone. Call before JAX is imported."""
    if "JAX_PLATFORMS" not in environ and jax_backend_is_cpu(environ, **backend_probe):
        environ["JAX_PLATFORMS"] = "cpu"


def wants_malloc_tuning(environ: Mapping[str, str], **backend_probe) -> bool:
    """FLAN_JAX_MALLOC_TUNING=0: never; =1: always; unset: only for the CPU backend."""
    choice = environ.get(OPT_OUT_VARIABLE)
    if choice in ("0", "1"):
        return choice == "1"
    return jax_backend_is_cpu(environ, **backend_probe)


def tuned_environ(environ: Mapping[str, str]) -> dict:
    """A copy of `environ` whose GLIBC_TUNABLES also holds MALLOC_TUNABLES (names already set keep their values)."""
    env = dict(environ)
    if env.get(OPT_OUT_VARIABLE) == "0":
        return env
    current = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.split("=", 1)[0] for t in current}
    merged = current + [t for t in MALLOC_TUNABLES if t.split("=", 1)[0] not in names]
    env["GLIBC_TUNABLES"] = ":".join(merged)
    return env


def reexec_with_tuned_malloc(python_args: Sequence[str]) -> None:
    """On Linux with the CPU backend, replace this process by `python python_args...` with tuned_environ, unless that
    is already in effect.

    Call it first thing in a command-line entry point, before heavy imports; python_args re-creates the command (e.g.
    ["-m", "flan_jax.cli", *sys.argv[1:]]). Returns only when nothing needs to change.
    """
    if not sys.platform.startswith("linux") or not wants_malloc_tuning(os.environ):
        return
    env = tuned_environ(os.environ)
    if env.get("GLIBC_TUNABLES", "") == os.environ.get("GLIBC_TUNABLES", ""):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *python_args], env)
