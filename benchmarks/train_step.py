"""Training-step cost of every quantizer against its full-precision twin.

  python -m benchmarks.train_step [--models=resnet20,resnet18_cifar,vgg_small]
      [--quantizers=identity,ste,approx_sign,fda,fda_no_noise,biper,bnn_pp]
      [--batch_size=128] [--dtype=float32|bfloat16] [--repeats=5] [--window_steps=5]
      [--num_devices=N] [--image_shape=H,W,C] [--peak_tflops=T] [--peak_tbps=B]
      [--json=runs/benchmarks/train_step.json]

On one H100, the issue's measurement (resnet18_cifar with BiPer, batch 256,
bfloat16; aim: 25,000 images/s or more):

  python -m benchmarks.train_step --models=resnet18_cifar --quantizers=biper \
      --batch_size=256 --dtype=bfloat16

Each configuration is a training run's own: its config comes from
`experiments/configs/recipes.py` (`full_precision` for the identity twin, the
straight-through `baseline`s ste, approx_sign and bnn_pp, `fda` with and
without its noise adaptation modules, `biper` stage 2), with only the data
(`inputs.create` on synthetic images of the model's input shape), the batch
size, the compute dtype and the devices replaced. The step is
`train.make_train_step` (augmentation, model, loss, regulariser, SGD and
schedules) on the global uint8 batch `parallel.host_batch_gatherer` draws, as
in `train.train_and_evaluate`; a timed step is the trainer's loop body, gather
then step. Per configuration:

* init: seconds of `train.create_state` (compiling and running the
  initialisation) before the first step; compile: seconds to lower and compile
  the step ahead of time (`jit(step).lower(...).compile()`); the compiled step
  is the one timed; their sum is the wait before the first step;
* step: after one warm-up step, `--repeats` windows of `--window_steps` steps,
  each ending with `jax.block_until_ready`; the median window's seconds per
  step, and images/s. The windows are interleaved: each repeat times every
  configuration of a model once, round-robin (the starting one rotates), so
  load changes on a shared machine hit all of them alike and the ratios hold
  better than the absolute times;
* vs FP: the median over the repeats of the step time over the identity
  twin's in the same repeat (the twin is always measured), against the
  target: at most 1.10x on CPU, 1.05x on an accelerator, 1.25x for FDA with
  its noise modules;
* CPU ms/step and vs FP (CPU time): the same from this process's CPU time
  (`time.process_time`, all threads). On a shared CPU the wall-clock windows
  swing with the other processes' load (2x from one window to the next was
  seen), while the CPU time a step takes barely moves: its ratio measures the
  extra work a quantizer adds, the wall-clock one what a user waits. It
  misses a loss of parallelism (a serial fusion costs the same CPU time) and
  counts idle worker threads' spinning. On an accelerator the CPU time is the
  host's alone, so no ratio is given;
* model GFLOP/s: 2 FLOPs per multiply-accumulate of `summary.summarize`'s
  count, times 3 for forward and backward (the backward pass of a conv or
  dense layer is two products of the forward's size, one for the input's
  gradient and one for the kernel's), times the batch, over the step time.
  An approximation: it leaves out BatchNorm, the quantizers, the noise
  adapters and the optimizer. XLA's own count of the compiled program,
  `cost_analysis()` (per device, summed over the devices), is given beside
  it, with its transcendental operations (sin, cos, exp, ...), where the
  quantizers show;
* of peak: model GFLOP/s per device over the device's peak FLOP/s (the
  model FLOPs utilisation); roofline: the least time a step can take on one
  device, its FLOPs (`roofline_flops`: XLA's count or the model's, the larger)
  at the peak FLOP/s or XLA's bytes accessed at the peak memory bandwidth,
  whichever is longer, and which one ('compute' or
  'memory' bound): a step far above its roofline is limited by neither (by
  launches, small kernels, the host). The peaks come from `DEVICE_PEAKS`
  (data-sheet figures by `device_kind`: bf16, so for bfloat16 compute only)
  or from `--peak_tflops` / `--peak_tbps`; n/a where neither gives them (on
  CPU);
* memory: XLA's buffer assignment of the compiled step (arguments + outputs +
  temporaries - donated aliases), on every backend. The device's own peak,
  `device.memory_stats()['peak_bytes_in_use']`, is a maximum over the whole
  process, so it is reported once per run; the CPU backend reports none
  (`memory_stats()` is None).

The input pipeline alone, per model: gather + augment + normalize as the step
does them before the model (same key folding, padding and flip), timed in the
same interleaved windows. "input share" is its time over a full step's; the
pipeline should deliver at least 10x the images/s of the model's fastest step.

Measurements and the variants tried, with dates: benchmarks/NOTES.md.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import os
import platform
import re
import shlex
import sys
import time
from typing import Any, Callable, Sequence

import flax
import jax
import numpy as np
from absl import flags

from experiments.configs import recipes
from benchmarks import run_and_report
from fda_biper_jax.data import inputs
from fda_biper_jax import models, parallel, summary, trace, train
from fda_biper_jax.cli import command

REFERENCE = "identity"
DEFAULT_MODELS = ("resnet20", "resnet18_cifar", "vgg_small")
ACCELERATOR_MODELS = ("resnet18",)  # at 224x224x3: only where an accelerator is present
NUM_CLASSES = 10
CPU_TARGET = 1.10
ACCELERATOR_TARGET = 1.05
TARGETS = {"fda": 1.25}  # FDA with its noise modules, on every backend
PIPELINE_TARGET = 10.0   # pipeline images/s over the fastest step's, at least
MIB = 2 ** 20

# Per-device peaks (bf16 dense TFLOP/s, memory TB/s), matched in order by a search of
# `device.device_kind`. Written out because no library in the stack knows them.
# NVIDIA: the data sheets list bf16 Tensor Core FLOP/s with 2:4 sparsity; a dense
# product gets half. Google Cloud's TPU pages: per chip, which is one JAX device
# from v4 on; a TPU v2 / v3 device is one of a chip's two cores, so half a chip.
DEVICE_PEAKS: tuple[tuple[str, float, float], ...] = (
    (r"H100 PCIe", 756.0, 2.0),
    (r"H100 NVL", 835.0, 3.9),
    (r"H100", 989.4, 3.35),        # SXM5, device_kind "NVIDIA H100 80GB HBM3"
    (r"H200 NVL", 835.0, 4.8),
    (r"H200", 989.4, 4.8),         # SXM
    (r"A100-SXM4-80GB", 312.0, 2.039),
    (r"A100 80GB PCIe", 312.0, 1.935),
    (r"A100", 312.0, 1.555),       # 40 GB
    (r"^TPU v2$", 22.5, 0.35),
    (r"^TPU v3$", 61.5, 0.45),
    (r"^TPU v4$", 275.0, 1.2),
    (r"^TPU v5 lite$", 197.0, 0.819),  # v5e
    (r"^TPU v5p?$", 459.0, 2.765),     # v5p
    (r"^TPU v6 lite$", 918.0, 1.64),   # v6e (Trillium)
)


def device_peak(device_kind: str, dtype: str, *, tflops: float | None = None,
                tbps: float | None = None) -> dict[str, Any]:
  """The device's peak FLOP/s and memory bandwidth, from `DEVICE_PEAKS` or the flags.

  The table's FLOP/s is the bf16 peak, so it is used for bfloat16 compute only
  (a float32 product's peak depends on TF32 and XLA's precision settings);
  `tflops` / `tbps` override it or give what the table lacks. None: unknown.
  """
  row = next((r for r in DEVICE_PEAKS if re.search(r[0], device_kind)), None)
  if tflops is None and row is not None and dtype == "bfloat16":
    tflops = row[1]
  if tbps is None and row is not None:
    tbps = row[2]
  return {"tflops": tflops, "tbps": tbps, "table_entry": None if row is None else row[0]}


def roofline_flops(measured: dict[str, Any]) -> float | None:
  """A step's FLOPs for its roofline: the larger of XLA's count and the model's.

  XLA's `cost_analysis()` leaves out convolutions that run as library calls (cuDNN
  custom calls on a GPU count nothing: resnet20's step at batch 256 on an H200 is
  1.7 GFLOP by XLA's count against the model's 62), so on a GPU the model's count
  is the one that bounds the step."""
  counts = [measured["xla_flops_per_step"], measured["model_flops_per_step"]]
  counts = [c for c in counts if c is not None]
  return max(counts) if counts else None


def roofline(flops: float | None, bytes_accessed: float | None, peak: dict[str, Any],
             num_devices: int = 1) -> tuple[float | None, str | None]:
  """(seconds, 'compute' | 'memory'): the least time a step needs for `flops`
  (`roofline_flops`) and XLA's `bytes_accessed` (summed over `num_devices` devices
  sharing them equally) at one device's peaks; (None, None) if a peak or a count is
  unknown."""
  if None in (flops, bytes_accessed, peak["tflops"], peak["tbps"]):
    return None, None
  compute = flops / num_devices / (1e12 * peak["tflops"])
  memory = bytes_accessed / num_devices / (1e12 * peak["tbps"])
  return max(compute, memory), "compute" if compute >= memory else "memory"


def _fda_without_noise(model: str):
  c = recipes.fda(model)
  for role in ("kernel_quantizer", "input_quantizer"):
    q = c.quantization[role].to_dict()
    del q["noise"], q["alpha"]
    c.quantization[role] = q
  return c


def _biper(model: str):
  c = recipes.biper(model, "stage2")
  c.init_from = ""  # a fresh start: the step is the same with stage 1's weights
  return c


# name -> model -> the recipe's training config; every other registered method with its
# own usage (`recipes.baseline`).
RECIPES: dict[str, Callable[[str], Any]] = {
    "identity": recipes.full_precision,
    "ste": functools.partial(recipes.baseline, "ste"),
    "approx_sign": functools.partial(recipes.baseline, "approx_sign"),
    "fda": recipes.fda,
    "fda_no_noise": _fda_without_noise,
    "biper": _biper,
    "bnn_pp": functools.partial(recipes.baseline, "bnn_pp"),
}


def recipe(name: str) -> Callable[[str], Any]:
  """The config maker of a benchmark case: `RECIPES`, else the method's usage."""
  if name in RECIPES:
    return RECIPES[name]
  return functools.partial(recipes.baseline, name)


def case_names() -> tuple[str, ...]:
  """Every case the benchmark can time: `RECIPES` and every registered method."""
  return tuple(dict.fromkeys([*RECIPES, *recipes.quick_methods()]))


def target(quantizer: str, backend: str) -> float | None:
  """The largest allowed step-time ratio to the twin (None for the twin)."""
  if quantizer == REFERENCE:
    return None
  return TARGETS.get(quantizer, CPU_TARGET if backend == "cpu" else ACCELERATOR_TARGET)


def benchmark_config(model: str, quantizer: str, *, batch_size: int, dtype: str,
                     image_shape: Sequence[int]):
  """The recipe's config with the benchmark's data (two batches), batch and dtype."""
  c = recipe(quantizer)(model)
  c.dataset = "synthetic"
  c.synthetic.image_shape = tuple(image_shape)
  c.synthetic.num_classes = NUM_CLASSES
  c.synthetic.num_train, c.synthetic.num_test = 2 * batch_size, 0
  c.batch_size, c.compute_dtype = batch_size, dtype
  return c


class Case:
  """One timed loop: `run(n)` takes the next n steps, then `wait(last output)` until the
  device has finished them (default `jax.block_until_ready`; another framework's
  synchronisation for its own steps)."""

  def __init__(self, name: str, body: Callable[[int], Any], measured: dict[str, Any],
               compiled: Any = None, wait: Callable[[Any], Any] = jax.block_until_ready):
    self.name, self.body, self.measured, self.wait = name, body, measured, wait
    self.compiled = compiled  # the compiled step (`compiled.as_text()`: its HLO), if any
    self.counter = itertools.count()

  def run(self, steps: int) -> None:
    out = None
    for _ in range(steps):
      out = self.body(next(self.counter))
    self.wait(out)


def _inputs(config, mesh):
  """(source, batch(i)): the trainer's input source (data on device) and its i-th
  global uint8 batch, cycling through the first epoch."""
  source = inputs.create(config, mesh, jax.random.key(config.seed))
  return source, lambda i: source.train_batch(i % source.steps_per_epoch)


def train_case(name: str, config, mesh) -> Case:
  """The compiled training step of `config`, with its compile time, memory and FLOPs."""
  train.validate(config, mesh)
  source, batch = _inputs(config, mesh)
  info = source.info
  model = train.create_model(config, info.num_classes, axis_name=parallel.AXIS)
  lr = train.learning_rate(config, source.steps_per_epoch)
  tx = train.make_optimizer(config, lr)
  key = jax.random.key(config.seed)
  init_start = time.perf_counter()
  state = jax.block_until_ready(train.create_state(model, tx, key, info.image_shape))
  init_s = time.perf_counter() - init_start
  state = parallel.replicate(state, mesh)
  step = train.make_train_step(model, tx, lr, mesh, source.preprocess,
                               total_steps=config.num_epochs * source.steps_per_epoch,
                               steps_per_epoch=source.steps_per_epoch,
                               quantizers=trace.quantizers(model, info.image_shape))
  start = time.perf_counter()
  lowered = step.lower(state, *batch(0), key)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  # XLA counts the per-device program: summed over the devices, a step's work.
  cost = {k: v * mesh.size for k, v in (compiled.cost_analysis() or {}).items()
          if k in ("flops", "transcendentals", "bytes accessed")}
  mem = compiled.memory_analysis()
  macs = summary.summarize(model, info.image_shape).totals.macs

  def body(i):
    nonlocal state
    state, metrics = compiled(state, *batch(i), key)
    return state, metrics

  return Case(name, body, {
      "quantization": train.quantization(config), "compute_dtype": config.compute_dtype,
      "init_s": init_s, "lower_s": lowered_at - start, "compile_s": compiled_at - lowered_at,
      "model_macs_per_example": int(macs),
      "model_flops_per_step": 2 * 3 * int(macs) * config.batch_size,
      "xla_flops_per_step": cost.get("flops"),
      "xla_transcendentals_per_step": cost.get("transcendentals"),
      "xla_bytes_accessed_per_step": cost.get("bytes accessed"),
      "xla_memory_bytes": None if mem is None else int(
          mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)}, compiled)


def pipeline_case(config, mesh) -> Case:
  """The step's input side alone: gather, then augment and normalize as the step does."""
  source, batch = _inputs(config, mesh)
  key = jax.random.key(config.seed)
  preprocess = jax.jit(lambda images, step: source.preprocess(jax.random.fold_in(key, step),
                                                              images))
  return Case("pipeline", lambda i: preprocess(batch(i)[0], i), {})


def time_interleaved(cases: Sequence[Case], repeats: int, window_steps: int
                     ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
  """(wall, cpu): seconds per step of every case in each window, after one warm-up step.

  Each repeat times one window of every case, round-robin, starting one case
  further along each time; cpu is this process's CPU time (all its threads).
  """
  for case in cases:
    case.run(1)
  wall: dict[str, list[float]] = {case.name: [] for case in cases}
  cpu: dict[str, list[float]] = {case.name: [] for case in cases}
  for r in range(repeats):
    k = r % len(cases)
    for case in [*cases[k:], *cases[:k]]:
      start, start_cpu = time.perf_counter(), time.process_time()
      case.run(window_steps)
      wall[case.name].append((time.perf_counter() - start) / window_steps)
      cpu[case.name].append((time.process_time() - start_cpu) / window_steps)
  return wall, cpu


def benchmark_model(model: str, quantizers: Sequence[str], mesh, *, batch_size: int,
                    dtype: str, image_shape: Sequence[int] | None, repeats: int,
                    window_steps: int, peak: dict[str, Any]
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """(rows, pipeline) of one model: every quantizer's step and the input pipeline;
  `peak` is `device_peak`'s for the mesh's devices."""
  shape = tuple(image_shape or summary.default_input_shape(model))
  configs = {q: benchmark_config(model, q, batch_size=batch_size, dtype=dtype,
                                 image_shape=shape) for q in quantizers}
  cases = [train_case(q, c, mesh) for q, c in configs.items()]
  pipe = pipeline_case(configs[REFERENCE], mesh)
  wall, cpu = time_interleaved([*cases, pipe], repeats, window_steps)
  times = {k: float(np.median(v)) for k, v in wall.items()}
  backend = mesh.devices.flat[0].platform

  def paired(windows: dict[str, list[float]], a: str, b: str) -> float:
    """Median over the repeats of a's window time over b's in the same repeat."""
    return float(np.median(np.divide(windows[a], windows[b])))

  rows = []
  for case in cases:
    t = times[case.name]
    ratio = paired(wall, case.name, REFERENCE)
    # Host CPU time is the step's work on the CPU backend only.
    cpu_ratio = paired(cpu, case.name, REFERENCE) if backend == "cpu" else None
    bound = target(case.name, backend)
    floor, limit = roofline(roofline_flops(case.measured),
                            case.measured["xla_bytes_accessed_per_step"], peak, mesh.size)
    flops_per_s = case.measured["model_flops_per_step"] / t
    rows.append({
        "model": model, "quantizer": case.name, "image_shape": list(shape),
        "batch_size": batch_size, **case.measured,
        "step_s": t, "step_s_windows": wall[case.name], "images_per_s": batch_size / t,
        "cpu_s": float(np.median(cpu[case.name])), "cpu_s_windows": cpu[case.name],
        "ratio_to_fp": ratio, "cpu_ratio_to_fp": cpu_ratio, "target": bound,
        "within_target": None if bound is None else ratio <= bound,
        "cpu_within_target": None if bound is None or cpu_ratio is None else cpu_ratio <= bound,
        "model_flops_per_s": flops_per_s,
        "peak_flops_share": None if peak["tflops"] is None
                            else flops_per_s / mesh.size / (1e12 * peak["tflops"]),
        "roofline_s": floor, "roofline_bound": limit,
        "input_share": paired(wall, "pipeline", case.name)})
  fastest = max(r["images_per_s"] for r in rows)
  speedup = batch_size / times["pipeline"] / fastest
  pipeline = {"model": model, "image_shape": list(shape), "batch_size": batch_size,
              "batch_s": times["pipeline"], "images_per_s": batch_size / times["pipeline"],
              "fastest_step_images_per_s": fastest, "speedup_over_step": speedup,
              "target": PIPELINE_TARGET, "within_target": speedup >= PIPELINE_TARGET}
  return rows, pipeline


def device_peak_bytes(mesh) -> int | None:
  """The largest `peak_bytes_in_use` of the mesh's devices; None if none reports it."""
  stats = [d.memory_stats() for d in mesh.devices.flat]
  peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
  return max(peaks) if peaks else None


def run(model_names: Sequence[str], quantizers: Sequence[str], *, batch_size: int = 128,
        dtype: str = "float32", repeats: int = 5, window_steps: int = 5,
        num_devices: int | None = None, image_shape: Sequence[int] | None = None,
        peak_tflops: float | None = None, peak_tbps: float | None = None,
        command: str = "") -> dict[str, Any]:
  """Measures every model with every quantizer (and the identity twin); returns the results.

  `peak_tflops` / `peak_tbps`: one device's peak FLOP/s (of the compute dtype) and
  memory bandwidth, where `DEVICE_PEAKS` lacks them or to override it."""
  mesh = parallel.make_mesh(num_devices)
  device = mesh.devices.flat[0]
  peak = device_peak(device.device_kind, dtype, tflops=peak_tflops, tbps=peak_tbps)
  quantizers = [REFERENCE, *(q for q in quantizers if q != REFERENCE)]
  load = os.getloadavg()
  rows, pipelines = [], []
  for name in model_names:
    r, p = benchmark_model(name, quantizers, mesh, batch_size=batch_size, dtype=dtype,
                           image_shape=image_shape, repeats=repeats, window_steps=window_steps,
                           peak=peak)
    rows += r
    pipelines.append(p)
  return {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
                 f"load average {load[0]:.1f} at start",
      "backend": device.platform, "device": device.device_kind, "num_devices": mesh.size,
      "jax": jax.__version__, "flax": flax.__version__, "command": command,
      "settings": {"models": list(model_names), "quantizers": quantizers,
                   "batch_size": batch_size, "dtype": dtype, "repeats": repeats,
                   "window_steps": window_steps, "warmup_steps": 1,
                   "image_shape": None if image_shape is None else list(image_shape)},
      "device_peak_bytes": device_peak_bytes(mesh), "peak": peak,
      "rows": rows, "pipeline": pipelines}


def _fmt(value, spec: str, scale: float = 1.0, unit: str = "") -> str:
  return "n/a" if value is None else format(value * scale, spec) + unit


def format_table(results: dict[str, Any]) -> str:
  """Markdown: the header, the step table, the input pipeline table and the notes."""
  s = results["settings"]
  peak_bytes, peak = results["device_peak_bytes"], results["peak"]
  lines = [
      f"Training step, {results['date']}: {results['machine']}; {results['num_devices']} x "
      f"{results['device']} ({results['backend']}); JAX {results['jax']}, "
      f"Flax {results['flax']}.", "",
      f"Command: `{results['command']}`", "",
      f"Batch {s['batch_size']} (global), {s['dtype']}; median of {s['repeats']} interleaved "
      f"windows of {s['window_steps']} step(s) after {s['warmup_steps']} warm-up step. "
      "Timings on a shared machine are noisy: compare the ratios, measured in the same "
      "windows, rather than the absolute times.", "",
      "| model | quantizer | init + compile (s) | step (ms) | images/s | vs FP | CPU ms/step "
      "| vs FP (CPU time) | target | model GFLOP/s | of peak | XLA GFLOP/step "
      "| transcendentals/step | roofline (ms) | XLA memory (MiB) | input share |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    bound = "reference"
    if r["target"] is not None:
      verdicts = [f"{'ok' if r['within_target'] else 'OVER'}"]
      if r["cpu_within_target"] is not None:
        verdicts = [f"wall {verdicts[0]}", f"CPU {'ok' if r['cpu_within_target'] else 'OVER'}"]
      bound = f"<= {r['target']:.2f}x: {', '.join(verdicts)}"
    lines.append(
        f"| {r['model']} | {r['quantizer']} "
        f"| {r['init_s']:.1f} + {r['lower_s'] + r['compile_s']:.1f} "
        f"| {1e3 * r['step_s']:.1f} | {r['images_per_s']:,.1f} | {r['ratio_to_fp']:.2f}x "
        f"| {1e3 * r['cpu_s']:.1f} | {_fmt(r['cpu_ratio_to_fp'], '.2f', unit='x')} "
        f"| {bound} | {r['model_flops_per_s'] / 1e9:.1f} "
        f"| {_fmt(r['peak_flops_share'], '.1f', 100, '%')} "
        f"| {_fmt(r['xla_flops_per_step'], '.3g', 1e-9)} "
        f"| {_fmt(r['xla_transcendentals_per_step'], '.3g')} "
        f"| {_fmt(r['roofline_s'], '.2f', 1e3)}"
        f"{'' if r['roofline_bound'] is None else ' ' + r['roofline_bound']} "
        f"| {_fmt(r['xla_memory_bytes'], ',.1f', 1 / MIB)} | {100 * r['input_share']:.1f}% |")
  lines += ["", "| model | image shape | input pipeline (ms/batch) | pipeline images/s "
            "| fastest step images/s | pipeline / step | target |", "|---|---|---|---|---|---|---|"]
  for p in results["pipeline"]:
    lines.append(
        f"| {p['model']} | {'x'.join(map(str, p['image_shape']))} | {1e3 * p['batch_s']:.2f} "
        f"| {p['images_per_s']:,.0f} | {p['fastest_step_images_per_s']:,.1f} "
        f"| {p['speedup_over_step']:.1f}x "
        f"| >= {p['target']:.0f}x {'ok' if p['within_target'] else 'UNDER'} |")
  lines += ["", "Model GFLOP/s: 2 FLOPs per MAC of `summary.summarize`, x3 for forward + "
            "backward (an approximation), x batch, over the step time. XLA GFLOP/step and "
            "transcendentals/step: XLA's count of the compiled program, summed over the "
            "devices; XLA memory: arguments + outputs + temporaries - donated, per device. "
            "Input share: gather + augment + normalize alone, over a full step. CPU ms/step: this "
            "process's CPU time (all threads), robust to other processes' load. "
            "Of peak: model GFLOP/s per device over the device's peak, "
            + (f"{peak['tflops']:g} TFLOP/s" if peak["tflops"] is not None else "unknown here")
            + "; roofline: the least time per step of the FLOPs (XLA's count or the model's, the "
            "larger: XLA counts no cuDNN convolution) and XLA's bytes per device at the "
            "peak FLOP/s and "
            + (f"{peak['tbps']:g} TB/s" if peak["tbps"] is not None else "a bandwidth unknown here")
            + ", and which of the two bounds it ("
            + (f"`DEVICE_PEAKS` entry {peak['table_entry']!r}" if peak["table_entry"] else
               "no `DEVICE_PEAKS` entry for this device")
            + "; `--peak_tflops` / `--peak_tbps` give or override them).",
            "Peak device memory (`device.memory_stats()`): "
            + (f"{peak_bytes / MIB:,.0f} MiB over the whole run." if peak_bytes is not None else
               f"not reported by the {results['backend']} backend (memory_stats() is None).")]
  return "\n".join(lines)


PROG = "python -m benchmarks.train_step"
# Its own flag values, as benchmarks.vs_pytorch's: main(argv) runs in-process (the tests).
FLAGS = flags.FlagValues()
command.define_names("models", ",".join(DEFAULT_MODELS), models.NAMES,
                     "The models (on an accelerator, resnet18 at 224x224x3 is added by default).",
                     flag_values=FLAGS)
command.define_names("quantizers", ",".join(RECIPES), case_names(),
                     "The quantizers; the identity twin is always measured too.",
                     flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 128, "Images per step.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", list(train.COMPUTE_DTYPES), "The compute dtype.",
                  flag_values=FLAGS)
flags.DEFINE_integer("repeats", 5, "Timed windows.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("window_steps", 5, "Steps per window.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("num_devices", None, "Devices (default: all).", lower_bound=1,
                     flag_values=FLAGS)
command.define("image_shape", None, lambda text: command.integers(text.replace("x", ","), 3),
               "H,W,C of positive integers", "The input shape of every model (default: each "
               "model's own, 224x224x3 for the ImageNet models, else 32x32x3).",
               flag_values=FLAGS)
command.define_positive_number("peak_tflops", None, "One device's peak TFLOP/s in the compute "
                               "dtype (default: DEVICE_PEAKS' bf16 figure for bfloat16).",
                               flag_values=FLAGS)
command.define_positive_number("peak_tbps", None, "One device's memory bandwidth in TB/s "
                               "(default: DEVICE_PEAKS').", flag_values=FLAGS)
flags.DEFINE_string("json", "runs/benchmarks/train_step.json", "Where the results go as JSON.",
                    flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
  """Parses argv (without the program name) and measures; a bad flag is one line, status 2."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    FLAGS.unparse_flags()
    FLAGS([PROG, *argv])
  except flags.Error as e:
    print(f"{PROG}: error: {command.flag_error(e)}", file=sys.stderr)
    return command.USAGE_ERROR
  models_ = FLAGS.models
  if not FLAGS["models"].present and jax.default_backend() != "cpu":
    models_ = [*DEFAULT_MODELS, *ACCELERATOR_MODELS]

  def measure():
    return run(models_, FLAGS.quantizers, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype,
               repeats=FLAGS.repeats, window_steps=FLAGS.window_steps,
               num_devices=FLAGS.num_devices, image_shape=FLAGS.image_shape,
               peak_tflops=FLAGS.peak_tflops, peak_tbps=FLAGS.peak_tbps,
               command=f"{PROG} {shlex.join(argv)}".strip())

  return run_and_report(PROG, measure, format_table, FLAGS.json)


if __name__ == "__main__":
  sys.exit(main())
