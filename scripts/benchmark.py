#!/usr/bin/env python
"""Runs one benchmark suite and prints its figures as a markdown table.

  python scripts/benchmark.py SUITE [--quick] [--json OUT] [--export-npz DIR | --from-npz DIR]
                                   [--case LABEL] [--dtype float32|bfloat16]     (train, CPU: a subset of cases)

SUITE is a module in scripts/bench/ (packing, ...) exposing run(quick) -> list of rows
{"suite", "name", "ours", "baseline", "ratio", "unit"}. --json writes the rows plus machine info to OUT.
"""
import argparse
import datetime
import importlib
import inspect
import json
import os
import pkgutil
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_SCRIPTS, os.path.dirname(_SCRIPTS)]  # scripts/ for `bench`, the repo root for `flan_jax`, `tasks`

# The same malloc settings as `flan-jax train`; ours and the baseline share the process, so both get them.
from flan_jax.utils.runtime_env import reexec_with_tuned_malloc  # noqa: E402

if __name__ == "__main__":
  reexec_with_tuned_malloc([os.path.abspath(__file__), *sys.argv[1:]])

import bench  # noqa: E402


def available_suites() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))


def _fmt(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
  return str(value)


def markdown_table(rows: list[dict]) -> str:
  lines = ["| suite | name | ours | baseline | ratio | unit |", "|---|---|---:|---:|---:|---|"]
  for r in rows:
    lines.append("| " + " | ".join(_fmt(r.get(k)) for k in bench.ROW_KEYS) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  suites = available_suites()
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("suite", choices=suites)
  parser.add_argument("--quick", action="store_true", help="small sizes; finishes in about a minute")
  parser.add_argument("--json", metavar="OUT", help="also write rows and machine info as JSON")
  parser.add_argument("--export-npz", metavar="DIR", help="(train) write packed batches for a GPU host without TF")
  parser.add_argument("--from-npz", metavar="DIR", help="(train) feed packed batches exported by --export-npz")
  parser.add_argument("--case", metavar="LABEL", help="(train, CPU) only the cases whose label contains LABEL, "
                      "e.g. llama_small_8l")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="(train, CPU) only this compute dtype")
  args = parser.parse_args(argv)

  module = importlib.import_module(f"bench.{args.suite}")
  start = time.time()
  extra = {k: v for k, v in (("export_npz_dir", args.export_npz), ("from_npz", args.from_npz),
                              ("case", args.case), ("dtype", args.dtype)) if v}
  unsupported = [k for k in extra if k not in inspect.signature(module.run).parameters]
  if unsupported:
    parser.error(f"--export-npz / --from-npz / --case / --dtype apply to the train suite, not {args.suite!r}")
  rows = module.run(quick=args.quick, **extra)
  for r in rows:
    missing = [k for k in bench.ROW_KEYS if k not in r]
    if missing:
      raise ValueError(f"benchmark suite {args.suite!r} returned a row without {missing}: {r}")
  info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
          "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
          "python": platform.python_version(), "command": " ".join(sys.argv), "seconds": round(time.time() - start, 1)}
  print(f"\n{args.suite} ({'quick' if args.quick else 'full'}) on {info['machine']}, {info['cpus']} CPUs, "
        f"{info['date']}, {info['seconds']} s\n")
  print(markdown_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"info": info, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
