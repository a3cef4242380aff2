"""Benchmarks: timing runs of the library's own code, never part of the tests."""

import json
import os


def report(table: str, results, json_path: str) -> None:
  """Prints a benchmark's markdown table and writes its results as JSON."""
  print(table)
  os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
  with open(json_path, "w") as f:
    json.dump(results, f, indent=1)
