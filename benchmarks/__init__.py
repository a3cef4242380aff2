"""Benchmarks: timing runs of the library's own code, never part of the tests."""

import json
import os
import platform
import sys
from typing import Any, Callable


def report(table: str, results, json_path: str) -> None:
  """Prints a benchmark's markdown table and writes its results as JSON."""
  print(table)
  os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
  with open(json_path, "w") as f:
    json.dump(results, f, indent=1)


def run_and_report(prog: str, measure: Callable[[], Any], format_table: Callable[[Any], str],
                   json_path: str) -> int:
  """A benchmark's main: measure(), then its table and JSON; exit status 2 with one
  line on stderr when measure() rejects a setting (ValueError)."""
  try:
    results = measure()
  except ValueError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  report(format_table(results), results, json_path)
  return 0


def available_cores() -> int:
  """The CPUs this process may run on (its affinity; XLA:CPU's worker count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def cpu_model() -> str:
  """The CPU's model name (lscpu's), or the platform's processor string."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
