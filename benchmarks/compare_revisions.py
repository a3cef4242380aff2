"""The training step of this checkout against a git revision's, side by side in one process.

  python -m benchmarks.compare_revisions --base=REV [--models=resnet20]
      [--quantizers=identity,biper,fda,bnn_pp] [--batch_size=128] [--repeats=7]
      [--window_steps=3] [--json=runs/benchmarks/compare_revisions.json]

"Is the step no slower than before?" asks for a ratio measured in one run: two
processes on a shared machine see different loads. The base revision's
`fda_biper_jax`, `experiments` and `benchmarks` are extracted (`git archive`)
into a temporary folder under prefixed names (`base_fda_biper_jax`, ...,
every import rewritten), so both versions load into this process. Each
version builds its own step with its own `benchmarks.train_step`
(`benchmark_config` and `train_case`, the same recipes and synthetic data,
which both revisions must have), and `train_step.time_interleaved` times all
of them in round-robin windows. Per case: milliseconds per step of base and
current, and the current / base ratio (median of the per-window ratios) in
wall-clock and in process CPU time, with XLA's FLOPs and bytes of both
compiled programs (machine-independent).
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from typing import Any, Sequence

import jax
import numpy as np
from absl import flags

from benchmarks import run_and_report, train_step
from fda_biper_jax import models, parallel, summary
from fda_biper_jax.cli import command

FLAGS = flags.FLAGS

PACKAGES = ("fda_biper_jax", "experiments", "benchmarks")
PREFIX = "base_"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extract(rev: str, into: str) -> str:
  """Writes the revision's packages into `into` under prefixed names; returns `into`."""
  archive = subprocess.run(["git", "archive", "--format=tar", rev, *PACKAGES], cwd=ROOT,
                           capture_output=True, check=False)
  if archive.returncode:
    raise ValueError(f"--base={rev!r}: git archive failed: "
                     f"{archive.stderr.decode().strip().splitlines()[-1]}")
  names = "|".join(PACKAGES)
  pattern = re.compile(rf"\b({names})\b(?=[.\s,;)]|$)", re.M)
  with tarfile.open(fileobj=__import__("io").BytesIO(archive.stdout)) as tar:
    for member in tar.getmembers():
      if not member.isfile():
        continue
      top, _, rest = member.name.partition("/")
      path = os.path.join(into, PREFIX + top, rest)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      data = tar.extractfile(member).read()
      if member.name.endswith(".py"):
        data = pattern.sub(lambda m: PREFIX + m.group(1), data.decode()).encode()
      with open(path, "wb") as f:
        f.write(data)
  return into


def cost(case) -> dict[str, Any]:
  return {k: case.measured.get(k) for k in ("xla_flops_per_step", "xla_bytes_accessed_per_step",
                                            "xla_memory_bytes", "compile_s")}


def run(base: str, model_names: Sequence[str], quantizers: Sequence[str], *, batch_size: int,
        repeats: int, window_steps: int) -> dict[str, Any]:
  """Times every (model, quantizer) of both versions in one set of interleaved windows."""
  with tempfile.TemporaryDirectory(prefix="compare_revisions_") as tmp:
    sys.path.insert(0, extract(base, tmp))
    try:
      base_bench = importlib.import_module(PREFIX + "benchmarks.train_step")
      base_parallel = importlib.import_module(PREFIX + "fda_biper_jax.parallel")
    finally:
      sys.path.pop(0)
    mesh, base_mesh = parallel.make_mesh(), base_parallel.make_mesh()
    rows, cases = [], []
    for model in model_names:
      shape = summary.default_input_shape(model)
      for q in quantizers:
        kw = dict(batch_size=batch_size, dtype="float32", image_shape=shape)
        old = base_bench.train_case(f"base/{model}/{q}",
                                    base_bench.benchmark_config(model, q, **kw), base_mesh)
        new = train_step.train_case(f"current/{model}/{q}",
                                    train_step.benchmark_config(model, q, **kw), mesh)
        cases += [old, new]
        rows.append({"model": model, "quantizer": q, "base": cost(old), "current": cost(new)})
    wall, cpu = train_step.time_interleaved(cases, repeats, window_steps)
  for row in rows:
    key = f"{row['model']}/{row['quantizer']}"
    for clock, times in (("wall", wall), ("cpu", cpu)):
      b, c = np.asarray(times[f"base/{key}"]), np.asarray(times[f"current/{key}"])
      row[f"base_{clock}_ms"] = 1e3 * float(np.median(b))
      row[f"current_{clock}_ms"] = 1e3 * float(np.median(c))
      row[f"{clock}_ratio"] = float(np.median(c / b))
      row[f"{clock}_ratios"] = [float(r) for r in c / b]
  return {"date": datetime.date.today().isoformat(),
          "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
                     f"cores, {jax.devices()[0].platform}",
          "command": "python -m benchmarks.compare_revisions " + shlex.join(sys.argv[1:]),
          "base": base, "current": _head(), "batch_size": batch_size, "repeats": repeats,
          "window_steps": window_steps, "rows": rows}


def _head() -> str:
  out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                       text=True, check=False).stdout.strip()
  dirty = subprocess.run(["git", "status", "--porcelain", "--", *PACKAGES], cwd=ROOT,
                         capture_output=True, text=True, check=False).stdout.strip()
  return out + ("+changes" if dirty else "")


def format_table(results: dict[str, Any]) -> str:
  lines = [f"current ({results['current']}) against base ({results['base']}), batch "
           f"{results['batch_size']}, {results['repeats']} windows of "
           f"{results['window_steps']} steps; {results['machine']}, {results['date']}", "",
           "| model | quantizer | base ms/step | current ms/step | current / base, wall | "
           "current / base, CPU time | XLA GFLOP base / current | XLA GB base / current |",
           "|---|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    gflop = "/".join(f"{(s['xla_flops_per_step'] or 0) / 1e9:.1f}"
                     for s in (r["base"], r["current"]))
    gb = "/".join(f"{(s['xla_bytes_accessed_per_step'] or 0) / 1e9:.2f}"
                  for s in (r["base"], r["current"]))
    lines.append(f"| {r['model']} | {r['quantizer']} | {r['base_wall_ms']:.0f} | "
                 f"{r['current_wall_ms']:.0f} | {r['wall_ratio']:.3f} | {r['cpu_ratio']:.3f} | "
                 f"{gflop} | {gb} |")
  lines.append(f"\n`{results['command']}`")
  return "\n".join(lines)


def define_flags() -> None:
  flags.DEFINE_string("base", None, "The git revision to compare against.")
  command.define_names("models", "resnet20", models.NAMES, "The models.")
  command.define_names("quantizers", "identity,biper,fda,bnn_pp", train_step.case_names(),
                       "The quantizers (benchmarks/train_step.py's cases).")
  flags.DEFINE_integer("batch_size", 128, "Images per step.", lower_bound=1)
  flags.DEFINE_integer("repeats", 7, "Timed windows.", lower_bound=1)
  flags.DEFINE_integer("window_steps", 3, "Steps per window.", lower_bound=1)
  flags.DEFINE_string("json", "runs/benchmarks/compare_revisions.json",
                      "Where the results go as JSON.")
  flags.mark_flag_as_required("base")


def main(argv) -> int:
  command.no_arguments(argv)
  return run_and_report(command.prog(), lambda: run(
      FLAGS.base, FLAGS.models, FLAGS.quantizers, batch_size=FLAGS.batch_size,
      repeats=FLAGS.repeats, window_steps=FLAGS.window_steps), format_table, FLAGS.json)


if __name__ == "__main__":
  command.run(main, define_flags)
