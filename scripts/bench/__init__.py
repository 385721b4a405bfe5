"""Benchmark suites for scripts/benchmark.py.

Each suite is a module `scripts/bench/<suite>.py` exposing `run(quick: bool) -> list[dict]`, one dict per measured
figure: {"suite", "name", "ours", "baseline", "ratio", "unit"} (baseline/ratio may be None when there is no peer).
"""

ROW_KEYS = ("suite", "name", "ours", "baseline", "ratio", "unit")


def row(suite: str, name: str, ours: float, baseline, unit: str) -> dict:
  """One result row; ratio = ours / baseline when both are numbers."""
  ratio = ours / baseline if isinstance(baseline, (int, float)) and baseline else None
  return {"suite": suite, "name": name, "ours": ours, "baseline": baseline, "ratio": ratio, "unit": unit}
