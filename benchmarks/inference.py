"""Latency and throughput of packed inference against the float eval path.

  python -m benchmarks.inference [--models=resnet20,resnet18_cifar] [--batch_sizes=1,256]
      [--windows=5] [--min_window_s=0.5] [--kernel_quantizer=biper]
      [--input_quantizer=approx_sign] [--scaling=learned] [--json=runs/benchmarks/inference.json]

For every backend JAX sees (cpu, and gpu when there is one), every model and
every batch size, two jitted forwards of the same network are timed:

* float: the model's own evaluation forward, `model.apply(train=False)`: a
  float32 convolution of +-1 inputs with +-scale kernels;
* packed: `inference.Predictor` on the network exported by `export.export`
  (xor-popcount on uint32 words, BatchNorm folded).

The variables are random, in the shapes `model.init` gives, with non-trivial
BatchNorm statistics (`random_variables`); the quantization is BiPer's by
default. Each forward is compiled and run once before timing; then
`--windows` windows each repeat it (with `block_until_ready`) until
`--min_window_s` seconds have passed, and the median window's time per call
is reported, as milliseconds per batch and images per second, whichever path
wins. A markdown table (and the exported file's size against the model's
float32 parameters) goes to stdout, the numbers to the `--json` file.

Where the packed path loses, and why. XLA has no popcount-GEMM: the
xor-popcount "matrix product" is a fused elementwise loop (xor, popcount,
integer add, vectorised over output channels), without the register
blocking and cache tiling of a real BNN kernel (daBNN, Larq Compute
Engine), and on a CPU without AVX-512 VPOPCNTDQ (as the AMD EPYC with AVX2
it was measured on) a vector popcount takes several byte-shuffle
instructions, while the float path calls a tuned convolution library. The packed path also pays, per
layer and call, the sign and bit packing of its input, im2col on the packed
words, the padding correction, and the int -> float scale and bias. These
fixed costs dominate narrow layers (ResNet-20's 16-64 channels, where at 16
channels half of every word is padding); wide layers and batch 1 favour the
packed path. The GPU rows, where there is one, time the same two XLA
programs. Measurements, with dates: benchmarks/NOTES.md.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import run_and_report
from fda_biper_jax import layers, methods, models, summary
from fda_biper_jax.cli import command
from fda_biper_jax.deploy import export, inference

FLAGS = flags.FLAGS

DEFAULT_MODELS = ("resnet20", "resnet20_fda", "resnet18_cifar", "vgg_small")
DEFAULT_BATCH_SIZES = (1, 256)


def random_variables(model, input_shape: Sequence[int], seed: int = 0,
                     negative_bn_scales: float = 0.0) -> dict[str, Any]:
  """Random numpy variables of `model` in the shapes of `model.init` (only traced).

  Kernels N(0, 1 / fan_in); scales U(0.5, 1.5), a `negative_bn_scales` share
  of those of BatchNorms (modules named 'bn') negated; biases N(0, 0.5);
  running means N(0, 1), running variances exp(N(0, 0.5)); any other
  parameter (PReLU slopes) U(0, 0.5).
  """
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, a):
    names = [str(getattr(k, "key", k)) for k in path]
    leaf, shape = names[-1], a.shape
    if names[0] == "batch_stats":
      v = rng.normal(0, 1, shape) if leaf == "mean" else np.exp(rng.normal(0, 0.5, shape))
    elif leaf == "kernel":
      v = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
    elif leaf == "scale":
      v = rng.uniform(0.5, 1.5, shape)
      if names[-2] == "bn":
        v = np.where(rng.uniform(size=shape) < negative_bn_scales, -v, v)
    elif leaf == "bias":
      v = rng.normal(0, 0.5, shape)
    else:
      v = rng.uniform(0, 0.5, shape)
    return v.astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def median_time(fn: Callable, args: Sequence[Any], windows: int, min_window_s: float) -> float:
  """Median over `windows` timed windows of the seconds per call of fn(*args)."""
  for _ in range(2):  # compile, then one warm call
    jax.block_until_ready(fn(*args))
  per_call = []
  for _ in range(windows):
    n, start = 0, time.perf_counter()
    while True:
      jax.block_until_ready(fn(*args))
      n += 1
      elapsed = time.perf_counter() - start
      if elapsed >= min_window_s:
        break
    per_call.append(elapsed / n)
  return float(np.median(per_call))


def _backends() -> list[jax.Device]:
  platforms = sorted({d.platform for d in jax.devices()} | {"cpu"})
  return [jax.devices(p)[0] for p in platforms]


def run(model_names: Sequence[str], batch_sizes: Sequence[int], *, windows: int = 5,
        min_window_s: float = 0.5, seed: int = 0, **quantization) -> dict[str, Any]:
  """Times both paths for every backend, model and batch size; returns the results."""
  rows, sizes = [], []
  for name in model_names:
    shape = summary.default_input_shape(name)
    model = models.create(name, 10, **quantization)
    variables = random_variables(model, shape, seed)
    packed = export.export(model, variables, shape)
    sizes.append({"model": name, **packed.sizes()})
    predictor = inference.Predictor(packed)
    forward = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
    for device in _backends():
      v, operands = jax.device_put((variables, predictor.operands), device)
      for batch in batch_sizes:
        x = jax.device_put(
            jax.random.normal(jax.random.key(seed), (batch, *shape), jnp.float32), device)
        agree = bool(jnp.all(jnp.argmax(forward(v, x), -1)
                             == jnp.argmax(predictor.apply(operands, x), -1)))
        t_float = median_time(forward, (v, x), windows, min_window_s)
        t_packed = median_time(predictor.apply, (operands, x), windows, min_window_s)
        rows.append({"backend": device.platform, "device": device.device_kind, "model": name,
                     "input_shape": list(shape), "batch": batch,
                     "float_ms": 1e3 * t_float, "packed_ms": 1e3 * t_packed,
                     "float_images_per_s": batch / t_float,
                     "packed_images_per_s": batch / t_packed,
                     "packed_speedup": t_float / t_packed, "predictions_agree": agree})
  return {"date": datetime.date.today().isoformat(),
          "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
          "jax": jax.__version__, "quantization": quantization,
          "settings": {"windows": windows, "min_window_s": min_window_s, "seed": seed},
          "rows": rows, "sizes": sizes}


def format_table(results: dict[str, Any]) -> str:
  """Markdown: the timing table, then the size table."""
  lines = ["| backend | model | batch | float eval (ms) | packed (ms) | float (img/s) "
           "| packed (img/s) | packed speed-up |", "|---|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    lines.append(f"| {r['backend']} | {r['model']} | {r['batch']} | {r['float_ms']:.2f} "
                 f"| {r['packed_ms']:.2f} | {r['float_images_per_s']:,.1f} "
                 f"| {r['packed_images_per_s']:,.1f} | {r['packed_speedup']:.2f}x |")
  lines += ["", "| model | exported file (bytes) | float32 parameters (bytes) | ratio |",
            "|---|---|---|---|"]
  for s in results["sizes"]:
    lines.append(f"| {s['model']} | {s['file_bytes']:,} | {s['float32_param_bytes']:,} "
                 f"| 1/{1 / s['ratio']:.1f} |")
  lines.append(f"\nMedian of {results['settings']['windows']} windows of >= "
               f"{results['settings']['min_window_s']} s after warm-up; {results['machine']}, "
               f"JAX {results['jax']}, {results['date']}; quantization {results['quantization']}.")
  return "\n".join(lines)


def define_flags() -> None:
  command.define_names("models", ",".join(DEFAULT_MODELS), models.NAMES, "The models.")
  command.define_integers("batch_sizes", ",".join(map(str, DEFAULT_BATCH_SIZES)),
                          "The batch sizes.")
  flags.DEFINE_integer("windows", 5, "Timed windows per forward.", lower_bound=1)
  flags.DEFINE_float("min_window_s", 0.5, "Seconds a window lasts at least.", lower_bound=0)
  flags.DEFINE_enum("kernel_quantizer", "biper", list(methods.names()), "The kernels' quantizer.")
  flags.DEFINE_enum("input_quantizer", "approx_sign", list(methods.names()),
                    "The inputs' quantizer.")
  flags.DEFINE_enum("scaling", "learned", list(layers.SCALINGS), "The weight scaling.")
  flags.DEFINE_string("json", "runs/benchmarks/inference.json", "Where the results go as JSON.")


def main(argv) -> int:
  command.no_arguments(argv)

  def measure():
    return run(FLAGS.models, FLAGS.batch_sizes, windows=FLAGS.windows,
               min_window_s=FLAGS.min_window_s, kernel_quantizer=FLAGS.kernel_quantizer,
               input_quantizer=FLAGS.input_quantizer, scaling=FLAGS.scaling)

  return run_and_report(command.prog(), measure, format_table, FLAGS.json)


if __name__ == "__main__":
  command.run(main, define_flags)
