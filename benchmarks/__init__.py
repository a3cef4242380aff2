"""Benchmarks: timing runs of the library's own code, never part of the tests."""

import json
import os
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
