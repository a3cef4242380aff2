"""Throughput of the streaming ImageNet input pipeline (`fda_biper_jax.streaming`) on the CPU.

  python -m benchmarks.input_pipeline [--num_images=2000] [--num_eval_images=500]
      [--height=250,450] [--width=300,500] [--image_size=224] [--batch_size=128]
      [--num_parallel_calls=N] [--dtypes=float32,bfloat16] [--windows=5] [--window_batches=4]
      [--warmup_batches=2] [--target=5000] [--data_dir=DIR]
      [--json=runs/benchmarks/input_pipeline.json]

A `synthetic_jpeg` dataset (`fda_biper_jax.data.datasets.synthetic_jpeg`) of ImageNet-like
JPEGs (heights uniform in --height, widths in --width: about 350 x 400 px and 90 KB per
file on average by default, near a typical ImageNet image) is prepared in --data_dir (default
a temporary folder, deleted afterwards; a given one is kept and reused). Then, for the
training pipeline (`streaming.train_batches`: decode_and_crop_jpeg of a
RandomResizedCrop window, resize to --image_size, flip, normalise) and the evaluation
pipeline (`streaming.eval_batches`: full decode, shorter side to 256, centre crop,
normalise), in each output dtype, batches are drawn epoch after epoch (each epoch a new
call, as the trainer makes it) and timed as the trainer would consume them, as numpy
arrays on the host: after --warmup_batches batches, --windows windows of
--window_batches batches each; the median window gives images/s. Padding images of the
evaluation batches are not counted. Per window, the process's CPU time (all of
TensorFlow's threads) is measured too:

* images/s: wall clock, what a training step could get from this host;
* per core: images/s over the cores this process may use (`os.sched_getaffinity`);
* per CPU-second: images per second of CPU time actually spent, the pipeline's cost
  per core fully used. On a shared machine the wall-clock figures swing with the
  other processes' load; this one barely moves, and it is what sizes a host;
* cores for target: --target images/s over the per-CPU-second rate.

How much a GPU needs. A ResNet-18 training step at 224 x 224 in bfloat16 on one H100
consumes some thousands of images per second: NVIDIA's published mixed-precision
ResNet-50 training runs at about 2,500-3,000 images/s per A100, an H100 is roughly
twice an A100, and ResNet-18 has 2.3x fewer FLOPs than ResNet-50 (1.8 vs 4.1
GFLOPs), so 5,000-10,000 images/s for a plain ResNet-18, less for a binary one whose
quantizers add elementwise work. --target (default 5,000) is that estimate, not a
measurement (no GPU was available when this was written; `benchmarks/train_step.py`
measures the step on one).

Measurements, with dates: benchmarks/NOTES.md.
"""

from __future__ import annotations

import datetime
import itertools
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any, Iterator, Sequence

import numpy as np
from absl import flags

from benchmarks import available_cores, cpu_model, run_and_report
from fda_biper_jax.cli import command
from fda_biper_jax.data import streaming

FLAGS = flags.FLAGS

DEFAULT_TARGET = 5000.0  # images/s one H100 step may consume (estimate, see the docstring)


def prepare(name: str, data_dir: str) -> dict[str, Any]:
  """Builds the synthetic dataset (unless there) and describes its JPEGs."""
  tfds = streaming.import_tfds()
  import tensorflow as tf  # noqa: PLC0415

  start = time.perf_counter()
  info = streaming.info(name, data_dir=data_dir)
  prepare_s = time.perf_counter() - start
  builder = tfds.builder(name, data_dir=data_dir)
  ds = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  sizes, shapes = [], []
  for ex in ds.take(500):
    sizes.append(len(ex["image"].numpy()))
    shapes.append(tf.io.extract_jpeg_shape(ex["image"]).numpy()[:2])
  shapes = np.asarray(shapes, np.float64)
  return {"name": name, "num_train": info.num_train, "num_eval": info.num_eval,
          "prepare_s": prepare_s, "mean_jpeg_bytes": float(np.mean(sizes)),
          "mean_height": float(shapes[:, 0].mean()), "mean_width": float(shapes[:, 1].mean())}


def _batches(mode: str, info, *, batch_size: int, dtype: str, data_dir: str,
             num_parallel_calls: int | None) -> Iterator[tuple[int, float]]:
  """Endless (number of real images, bytes of the images array) per batch, epoch after epoch."""
  for epoch in itertools.count():
    if mode == "train":
      stream = streaming.train_batches(info, batch_size=batch_size, seed=0, epoch=epoch,
                                       data_dir=data_dir, dtype=dtype,
                                       num_parallel_calls=num_parallel_calls)
    else:
      stream = streaming.eval_batches(info, batch_size=batch_size, data_dir=data_dir,
                                      dtype=dtype, num_parallel_calls=num_parallel_calls)
    for batch in stream:
      yield (int(batch[2].sum()) if mode == "eval" else batch_size), batch[0].nbytes


def measure(mode: str, info, *, batch_size: int, dtype: str, data_dir: str,
            num_parallel_calls: int | None, windows: int, window_batches: int,
            warmup_batches: int) -> dict[str, Any]:
  """Times one pipeline: first batch, then windows of batches after the warm-up."""
  start = time.perf_counter()
  stream = _batches(mode, info, batch_size=batch_size, dtype=dtype, data_dir=data_dir,
                    num_parallel_calls=num_parallel_calls)
  _, batch_bytes = next(stream)
  first_batch_s = time.perf_counter() - start
  for _ in range(max(warmup_batches - 1, 0)):
    next(stream)
  rates, cpu_rates = [], []
  for _ in range(windows):
    wall0, cpu0 = time.perf_counter(), time.process_time()
    images = sum(next(stream)[0] for _ in range(window_batches))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    rates.append(images / wall)
    cpu_rates.append(images / max(cpu, 1e-9))
  stream.close()
  cores = available_cores()
  rate, cpu_rate = float(np.median(rates)), float(np.median(cpu_rates))
  return {"mode": mode, "dtype": dtype, "batch_size": batch_size,
          "images_per_s": rate, "images_per_s_windows": rates,
          "images_per_s_per_core": rate / cores,
          "images_per_cpu_s": cpu_rate, "images_per_cpu_s_windows": cpu_rates,
          "first_batch_s": first_batch_s, "batch_bytes": int(batch_bytes)}


def run(*, num_images: int = 2000, num_eval_images: int = 500,
        height: Sequence[int] = (250, 450), width: Sequence[int] = (300, 500),
        image_size: int = 224, batch_size: int = 128, num_parallel_calls: int | None = None,
        dtypes: Sequence[str] = streaming.DTYPES, windows: int = 5, window_batches: int = 4,
        warmup_batches: int = 2, target: float = DEFAULT_TARGET, data_dir: str | None = None,
        command: str = "") -> dict[str, Any]:
  """Prepares the dataset and times both pipelines in each dtype; returns the results."""
  from fda_biper_jax.data.datasets import synthetic_jpeg  # noqa: PLC0415  (imports tfds)
  import tensorflow as tf  # noqa: PLC0415

  name = synthetic_jpeg.dataset_name(num_images, num_eval_images, tuple(height), tuple(width))
  own_dir = data_dir is None
  data_dir = tempfile.mkdtemp(prefix="input_pipeline_tfds_") if own_dir else data_dir
  load = os.getloadavg()
  try:
    dataset = prepare(name, data_dir)
    info = streaming.info(name, data_dir=data_dir, image_size=image_size)
    rows = []
    for mode in ("train", "eval"):
      for dtype in dtypes:
        row = measure(mode, info, batch_size=batch_size, dtype=dtype, data_dir=data_dir,
                      num_parallel_calls=num_parallel_calls, windows=windows,
                      window_batches=window_batches, warmup_batches=warmup_batches)
        row["cores_for_target"] = target / row["images_per_cpu_s"]
        rows.append(row)
  finally:
    if own_dir:
      shutil.rmtree(data_dir, ignore_errors=True)
  return {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": f"{platform.system()} {platform.machine()}, {cpu_model()}, "
                 f"{os.cpu_count()} CPU cores, load average {load[0]:.1f} at start",
      "cores": available_cores(), "tensorflow": tf.__version__, "command": command,
      "settings": {"image_size": image_size, "batch_size": batch_size,
                   "num_parallel_calls": num_parallel_calls or "AUTOTUNE",
                   "dtypes": list(dtypes), "windows": windows, "window_batches": window_batches,
                   "warmup_batches": warmup_batches, "target_images_per_s": target},
      "dataset": dataset, "rows": rows}


def format_table(results: dict[str, Any]) -> str:
  s, d = results["settings"], results["dataset"]
  lines = [
      f"Input pipeline, {results['date']}: {results['machine']}; {results['cores']} cores "
      f"usable; TensorFlow {results['tensorflow']}.", "",
      f"Command: `{results['command']}`", "",
      f"Data: {d['num_train']} train / {d['num_eval']} eval synthetic JPEGs, mean "
      f"{d['mean_height']:.0f} x {d['mean_width']:.0f} px, {d['mean_jpeg_bytes'] / 1024:.0f} KB "
      f"(prepared in {d['prepare_s']:.1f} s). Output {s['image_size']} x {s['image_size']}, "
      f"per-process batch {s['batch_size']}, num_parallel_calls {s['num_parallel_calls']}; "
      f"median of {s['windows']} windows of {s['window_batches']} batch(es) after "
      f"{s['warmup_batches']} warm-up batch(es).", "",
      "| pipeline | dtype | images/s | images/s per core | images per CPU-s "
      f"| cores for {s['target_images_per_s']:,.0f} img/s | first batch (s) | MB per batch |",
      "|---|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    lines.append(f"| {r['mode']} | {r['dtype']} | {r['images_per_s']:,.1f} "
                 f"| {r['images_per_s_per_core']:,.1f} | {r['images_per_cpu_s']:,.1f} "
                 f"| {r['cores_for_target']:,.1f} | {r['first_batch_s']:.2f} "
                 f"| {r['batch_bytes'] / 2**20:.1f} |")
  lines.append(f"\n'cores for' = {s['target_images_per_s']:,.0f} images/s (an estimate of "
               "what one H100 step consumes; see the module docstring) over images per CPU-s.")
  return "\n".join(lines)


def min_max(text: str) -> tuple[int, int]:
  """'250,450' -> (250, 450): MIN,MAX with 1 <= MIN <= MAX."""
  lo, hi = command.integers(text, 2)
  if lo > hi:
    raise ValueError(f"{text!r}: MIN > MAX")
  return lo, hi


def define_flags() -> None:
  flags.DEFINE_integer("num_images", 2000, "Training images of the synthetic dataset.",
                       lower_bound=1)
  flags.DEFINE_integer("num_eval_images", 500, "Its evaluation images.", lower_bound=1)
  command.define("height", "250,450", min_max, "MIN,MAX with 1 <= MIN <= MAX",
                 "Image heights, uniform in [MIN, MAX].", command.LIST)
  command.define("width", "300,500", min_max, "MIN,MAX with 1 <= MIN <= MAX",
                 "Image widths, uniform in [MIN, MAX].", command.LIST)
  flags.DEFINE_integer("image_size", 224, "Output side.", lower_bound=1)
  flags.DEFINE_integer("batch_size", 128, "Images per batch.", lower_bound=1)
  flags.DEFINE_integer("num_parallel_calls", None, "Threads of the decoding map (default: "
                       "tf.data.AUTOTUNE).", lower_bound=1)
  command.define_names("dtypes", ",".join(streaming.DTYPES), streaming.DTYPES,
                       "Output dtypes.")
  flags.DEFINE_integer("windows", 5, "Timed windows.", lower_bound=1)
  flags.DEFINE_integer("window_batches", 4, "Batches per window.", lower_bound=1)
  flags.DEFINE_integer("warmup_batches", 2, "Batches before the first window.", lower_bound=1)
  command.define_positive_number("target", DEFAULT_TARGET, "Images/s a GPU step consumes, for "
                                 "the 'cores for' column.")
  flags.DEFINE_string("data_dir", None, "tfds data_dir for the synthetic dataset (default: a "
                      "temporary one).")
  flags.DEFINE_string("json", "runs/benchmarks/input_pipeline.json",
                      "Where the results go as JSON.")


def main(argv) -> int:
  command.no_arguments(argv)

  def measure():
    return run(num_images=FLAGS.num_images, num_eval_images=FLAGS.num_eval_images,
               height=FLAGS.height, width=FLAGS.width, image_size=FLAGS.image_size,
               batch_size=FLAGS.batch_size, num_parallel_calls=FLAGS.num_parallel_calls,
               dtypes=FLAGS.dtypes, windows=FLAGS.windows, window_batches=FLAGS.window_batches,
               warmup_batches=FLAGS.warmup_batches, target=FLAGS.target,
               data_dir=FLAGS.data_dir,
               command=f"{command.prog()} {shlex.join(sys.argv[1:])}".strip())

  return run_and_report(command.prog(), measure, format_table, FLAGS.json)


if __name__ == "__main__":
  command.run(main, define_flags)
