"""Flags of `flan-jax train | eval` and a reading of gin files' macros, importing neither JAX nor TensorFlow.

`--help` (and `--gin_file=X --help`, which lists X's macros) is answered from here in well under a second; the
trainer's heavy imports happen only once a run is really asked for.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import os
from typing import Dict, Iterable, List, Optional, Sequence

from gin import config_parser

DESCRIPTION = """Flags follow T5X: --gin_file (repeatable), --gin.NAME=value (a macro or a binding such as
--gin.train.seed=3), --gin_bindings 'x = 1' (repeatable), --gin_search_paths a,b. Core code takes dataclasses; only
flan_jax/cli/train.py knows gin. `flan-jax train --gin_file=X --help` lists X's macros with their values."""
REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "gin_configs")


def gin_literal(value: str) -> str:
    """Lets users write --gin.MODEL_DIR=runs/x without quotes; gin literals and references pass through."""
    v = value.strip()
    if v.startswith(("@", "%", "'", '"', "{", "[", "(")) or v in ("True", "False", "None"):
        return v
    try:
        ast.literal_eval(v)
        return v
    except (ValueError, SyntaxError):
        return repr(v)


def build_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"flan-jax {command}", description=DESCRIPTION)
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="a gin binding, e.g. 'train.seed = 1'")
    parser.add_argument("--gin_search_paths", default="", help="comma-separated folders to find gin files in")
    parser.add_argument("--module", action="append", default=[],
                        help="a task-registration module to import first (repeatable; see flan_jax/user_modules.py)")
    parser.add_argument("--checkpoint", default=None, help="(eval) checkpoint_<step> dir, or MODEL_DIR for its latest")
    parser.add_argument("--predictions_dir", default=None,
                        help="(eval) write per-task predictions (and NIv2's official prediction file) here")
    parser.add_argument("--verbose", action="store_true",
                        help="show library logs (TensorFlow, absl, CUDA probing), hidden by default")
    return parser


def parse_flags(argv: Sequence[str], command: str = "train") -> argparse.Namespace:
    """Known flags, plus `args.overrides`: (NAME, gin literal) for each --gin.NAME=value."""
    parser = build_parser(command)
    args, rest = parser.parse_known_args(argv)
    args.overrides = []
    for item in rest:
        if not item.startswith("--gin.") or "=" not in item:
            parser.error(f"unrecognized argument {item!r} (expected --gin.NAME=value)")
        name, value = item[len("--gin."):].split("=", 1)
        args.overrides.append((name, gin_literal(value)))
    return args


# --- macros, read as text ------------------------------------------------------------------------------------------
class _Reference:
    """A parsed @configurable or %MACRO, shown as written."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


class _Delegate(config_parser.ParserDelegate):
    def configurable_reference(self, scoped_configurable_name, evaluate):
        return _Reference("@" + scoped_configurable_name + ("()" if evaluate else ""))

    def macro(self, macro_name):
        return _Reference("%" + macro_name)


def search_paths(extra: str = "") -> List[str]:
    """Where includes are looked up, in the order configure_gin registers them."""
    return [p for p in extra.split(",") if p] + [os.getcwd(), REPO_GIN_DIR]


def _find(name: str, paths: Iterable[str]) -> Optional[str]:
    if os.path.isfile(name):
        return name
    return next((os.path.join(p, name) for p in paths if os.path.isfile(os.path.join(p, name))), None)


def macro_values(gin_files: Sequence[str], paths: Sequence[str]) -> Dict[str, str]:
    """{MACRO: value as written} of gin files and their includes, later bindings winning as in gin."""
    macros: Dict[str, str] = {}
    for name in gin_files:
        path = _find(name, paths)
        if path is None:
            raise FileNotFoundError(f"--gin_file {name}: not found (looked in {', '.join(paths)})")
        with open(path) as f:
            parser = config_parser.ConfigParser(f, _Delegate())
            for statement in iter(parser.parse_statement, None):
                if isinstance(statement, config_parser.IncludeStatement):
                    macros.update(macro_values([statement.filename], paths))
                elif (isinstance(statement, config_parser.BindingStatement) and not statement.scope
                      and not statement.arg_name and "." not in statement.selector):
                    macros[statement.selector] = repr(statement.value)
    return macros


def macros_help(gin_files: Sequence[str], extra_paths: str = "") -> str:
    macros = macro_values(gin_files, search_paths(extra_paths))
    lines = [f"macros of {', '.join(gin_files)} (override with --gin.NAME=value):"]
    lines += [f"  {name} = {value}" for name, value in sorted(macros.items())]
    return "\n".join(lines)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest candidate, else ''."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def print_help(command: str, argv: Sequence[str]) -> int:
    """`flan-jax COMMAND [--gin_file=X] --help`: the flags, then X's macros when gin files are given."""
    parser = build_parser(command)
    args, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    print(parser.format_help())
    if args.gin_file:
        try:
            print(macros_help(args.gin_file, args.gin_search_paths))
        except (FileNotFoundError, SyntaxError, ValueError) as e:
            print(f"(cannot list the macros: {e})")
    return 0
