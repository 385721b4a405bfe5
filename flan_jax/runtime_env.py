"""Process environment for fast XLA:CPU steps: glibc malloc keeps large buffers and backs them with huge pages.

XLA:CPU allocates a step's temporaries afresh on every run. glibc serves blocks over 32 MiB with mmap and unmaps them
on free, so each step faults its whole working set in again, 4 KiB at a time: about 1M page faults and a fifth of a
T5 1.1 small step on the 2-core CI machine (docs/benchmarks.md). The tunables below keep freed memory in the heap for
reuse and let it use transparent huge pages. glibc reads them only at process start, so the command-line entry points
re-execute themselves once with them set. FLAN_JAX_MALLOC_TUNING=0 turns this off; GLIBC_TUNABLES values the user set
win over ours.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

MALLOC_TUNABLES = (
    "glibc.malloc.hugetlb=1",                    # madvise(MADV_HUGEPAGE) on the heap: 2 MiB faults, not 4 KiB
    "glibc.malloc.mmap_max=0",                   # big blocks from the heap too, so freeing them keeps the pages
    "glibc.malloc.trim_threshold=68719476736",   # never give the heap top back to the kernel between steps
)
OPT_OUT_VARIABLE = "FLAN_JAX_MALLOC_TUNING"


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
    """On Linux, replace this process by `python python_args...` with tuned_environ, unless that is already in effect.

    Call it first thing in a command-line entry point, before heavy imports; python_args re-creates the command (e.g.
    ["-m", "flan_jax.cli", *sys.argv[1:]]). Returns only when nothing needs to change.
    """
    if not sys.platform.startswith("linux"):
        return
    env = tuned_environ(os.environ)
    if env.get("GLIBC_TUNABLES", "") == os.environ.get("GLIBC_TUNABLES", ""):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *python_args], env)
