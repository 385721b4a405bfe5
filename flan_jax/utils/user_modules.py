"""`--module NAME` on `flan-jax train | eval | data`: import the user's task-registration modules first.

A module registered with `flan_jax.data.registry.register_task` at import time makes its tasks visible to gin
(`MIXTURE_OR_TASK_NAME`) and to `flan-jax data`. The working directory goes on `sys.path` first, as `python -m` does,
so a `mymodule.py` in it imports without a package (this also serves `import mymodule` lines in a gin file, T5X's
way); `--module path/to/mymodule.py` imports a file from its own folder.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Sequence


def import_modules(names: Sequence[str]) -> None:
    """Imports each dotted module name; a module that cannot be found raises ValueError naming it."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    for name in names:
        if name.endswith(".py"):  # a file path: import it by its stem from its own folder
            if not os.path.isfile(name):
                raise ValueError(f"--module {name}: no such file")
            folder = os.path.dirname(os.path.abspath(name))
            if folder not in sys.path:
                sys.path.insert(0, folder)
            name = os.path.basename(name)[:-3]
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                raise ValueError(f"--module {name}: no module named {e.name!r} (looked in the working directory "
                                 f"{cwd} and on PYTHONPATH)") from None
            raise  # the module exists but one of its own imports is missing: show the real traceback
