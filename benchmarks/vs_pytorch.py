"""The library's training step against a PyTorch twin, side by side in one process.

  python -m benchmarks.vs_pytorch [--batch_sizes 128,256] [--settings identity,biper]
      [--frameworks jax,torch] [--dtypes float32,bfloat16] [--repeats 5]
      [--window_steps 3] [--threads N] [--image_size 32]
      [--json runs/benchmarks/vs_pytorch.json]

Per batch size, dtype and setting, the steps of the same ResNet-20 (CIFAR,
10 classes) are timed, each a `--frameworks` entry:

* jax: the library's own training step, exactly as `benchmarks.train_step`
  builds it (`train_step.benchmark_config` of the recipe, then
  `train_step.train_case`: `train.create_model`, `train.make_train_step`,
  compiled ahead of time, synthetic uint8 data on the device, crop, flip and
  normalisation inside the step, one device): 'identity' is
  `recipes.full_precision('resnet20')`, 'biper' BiPer stage 2
  (`train_step.recipe('biper')`);
* jax_xla_defaults: the same step compiled with XLA's own defaults, without
  `xla_cpu.compiler_options()` (its opt-out), to show what they gain;
* torch: `benchmarks.torch_twin.TrainStep`, the same network, quantization,
  loss and SGD written in PyTorch (eager, NCHW), with the JAX config's
  learning rate, momentum and weight decay.

Devices and dtypes: both frameworks run on JAX's default backend, the CPU or
one CUDA GPU (PyTorch on 'cuda', with cuDNN's autotuning on; any other
backend stops with one line). `--dtypes`: 'float32', and 'bfloat16' for
mixed precision (float32 master weights; the library's
`compute_dtype='bfloat16'`, `torch.autocast` in the twin). On a GPU JAX is
given at most half the device memory (`XLA_PYTHON_CLIENT_MEM_FRACTION`,
unless set) so that PyTorch has room beside it, and a window ends when the
device has finished its steps (`jax.block_until_ready`,
`torch.cuda.synchronize`).

The steps of one batch size run in interleaved windows
(`train_step.time_interleaved`: each repeat times one window of
`--window_steps` steps of every case, round-robin, after one warm-up step),
so a change of the machine's load hits every framework alike. Reported per
case: the median ms/step (wall clock and this process's CPU time, all
threads) and, as the headline, its ratio to PyTorch: the median over the
repeats of the ratio of the two windows of the same repeat, with its range.
The JAX step's compile time (lower + compile) is given beside it, and the
share of the machine's CPU time other processes used while the windows ran
(from /proc/stat): a figure measured beside another busy process is not
one to keep, as PyTorch's OpenMP threads slow down far more than XLA's.

Threads: XLA:CPU runs one worker per CPU this process may use (its CPU
affinity); PyTorch is set to `--threads` intra-op threads, by default the
same number. To use fewer cores for both, start the process under
`taskset`.

PyTorch is optional: `--frameworks jax` times the JAX half alone (no torch
import); asking for the torch half without torch installed stops with one
line.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import shlex
import sys
import time
from typing import Any, Sequence

import flax
import jax
import numpy as np
from absl import flags

from benchmarks import available_cores, cpu_model, run_and_report, train_step
from fda_biper_jax import parallel, xla_cpu

PROG = "python -m benchmarks.vs_pytorch"
MODEL = "resnet20"
SETTINGS = ("identity", "biper")
DTYPES = ("float32", "bfloat16")
# 'jax': the library's step; 'jax_xla_defaults': the same step compiled with XLA's own
# defaults (`xla_cpu.compiler_options` opted out); 'torch': the PyTorch twin.
FRAMEWORKS = ("jax", "jax_xla_defaults", "torch")
REFERENCE = "torch"
NUM_CLASSES = train_step.NUM_CLASSES

FLAGS = flags.FlagValues()
flags.DEFINE_list("batch_sizes", ["128", "256"], "global batch sizes", flag_values=FLAGS)
flags.DEFINE_list("settings", list(SETTINGS), "'identity' (the float twin) and/or 'biper'",
                  flag_values=FLAGS)
flags.DEFINE_list("frameworks", ["jax", "torch"], f"any of {list(FRAMEWORKS)}",
                  flag_values=FLAGS)
flags.DEFINE_list("dtypes", ["float32"], f"compute dtypes, any of {list(DTYPES)}",
                  flag_values=FLAGS)
flags.DEFINE_integer("repeats", 5, "interleaved windows per case", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("window_steps", 3, "steps per window", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("threads", None, "PyTorch's intra-op threads (default: the CPUs this "
                     "process may run on, as many as XLA:CPU uses)", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("image_size", 32, "images are image_size x image_size x 3",
                     lower_bound=4, flag_values=FLAGS)
flags.DEFINE_string("json", "runs/benchmarks/vs_pytorch.json", "where the results go as JSON",
                    flag_values=FLAGS)


def machine_cpu_seconds() -> float | None:
  """CPU seconds the whole machine has been busy (all processes; /proc/stat), or None."""
  try:
    with open("/proc/stat") as f:
      fields = f.readline().split()
  except OSError:
    return None
  user, nice, system, _, _, irq, softirq, steal = (int(v) for v in fields[1:9])
  return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
  """Context: the share of the machine's CPUs other processes used while it ran, from
  the machine's busy CPU seconds minus this process's (`share`; None without /proc)."""

  def __enter__(self):
    self.start = (machine_cpu_seconds(), time.process_time(), time.perf_counter())
    self.share = None
    return self

  def __exit__(self, *exc):
    machine, own, wall = machine_cpu_seconds(), time.process_time(), time.perf_counter()
    if machine is not None and self.start[0] is not None:
      other = (machine - self.start[0]) - (own - self.start[1])
      self.share = max(0.0, other) / ((wall - self.start[2]) * (os.cpu_count() or 1))
    return False


def import_torch_twin(threads: int):
  """benchmarks.torch_twin with torch set to `threads` threads; ValueError (one line)
  when torch is not installed."""
  try:
    twin = importlib.import_module("benchmarks.torch_twin")
  except ModuleNotFoundError as e:
    if e.name != "torch":
      raise
    raise ValueError("the PyTorch half needs torch, which is not installed (pip install "
                     "torch, a CPU build); or pass --frameworks=jax") from None
  twin.torch.set_num_threads(threads)
  return twin


@contextlib.contextmanager
def xla_defaults():
  """Within: `xla_cpu.compiler_options()` is empty (the library's opt-out)."""
  old = os.environ.get(xla_cpu.OPT_OUT_ENV)
  os.environ[xla_cpu.OPT_OUT_ENV] = "0"
  try:
    yield
  finally:
    if old is None:
      del os.environ[xla_cpu.OPT_OUT_ENV]
    else:
      os.environ[xla_cpu.OPT_OUT_ENV] = old


def torch_device(twin) -> str:
  """PyTorch's device beside JAX's default backend: 'cpu', or 'cuda' on a GPU; ValueError
  (one line) where PyTorch cannot run beside it."""
  backend = jax.default_backend()
  if backend == "cpu":
    return "cpu"
  if backend in ("gpu", "cuda") and twin.torch.cuda.is_available():
    return "cuda"
  raise ValueError(f"JAX's backend is {backend!r}; the PyTorch half runs on 'cpu' or a CUDA "
                   "'gpu' that torch can see (torch.cuda.is_available()); or pass "
                   "--frameworks=jax")


def case_name(framework: str, dtype: str, setting: str) -> str:
  return f"{framework}/{dtype}/{setting}"


def jax_case(framework: str, setting: str, config, mesh) -> train_step.Case:
  """The library's compiled step (`train_step.train_case`), with XLA's own defaults for
  'jax_xla_defaults'."""
  name = case_name(framework, config.compute_dtype, setting)
  with xla_defaults() if framework == "jax_xla_defaults" else contextlib.nullcontext():
    return train_step.train_case(name, config, mesh)


def torch_case(twin, setting: str, config, device: str) -> train_step.Case:
  """The PyTorch twin's step with `config`'s quantization, batch, image size, compute dtype
  and SGD, on `device`."""
  opt = config.optimizer
  step = twin.TrainStep(train_step.train.quantization(config), batch_size=config.batch_size,
                        image_size=config.synthetic.image_shape[0],
                        learning_rate=float(opt.learning_rate), momentum=float(opt.momentum),
                        weight_decay=float(opt.weight_decay), num_classes=NUM_CLASSES,
                        seed=config.seed, device=device, dtype=config.compute_dtype)
  return train_step.Case(case_name("torch", config.compute_dtype, setting), step, {},
                         wait=step.wait)


def paired(windows: dict[str, list[float]], a: str, b: str) -> dict[str, float]:
  """{median, min, max} over the repeats of a's window time over b's in the same repeat."""
  r = np.divide(windows[a], windows[b])
  return {"median": float(np.median(r)), "min": float(np.min(r)), "max": float(np.max(r))}


def framework_row(framework: str, dtype: str, setting: str, batch_size: int,
                  case: train_step.Case, wall: dict[str, list[float]],
                  cpu: dict[str, list[float]]) -> dict[str, Any]:
  """One case's row: ms/step (wall, CPU) and, when PyTorch ran, the ratios to it."""
  name, ref = case.name, case_name(REFERENCE, dtype, setting)
  versus = ref in wall and name != ref
  return {"setting": setting, "batch_size": batch_size, "dtype": dtype, "framework": framework,
          "step_s": float(np.median(wall[name])), "step_s_windows": wall[name],
          "cpu_s": float(np.median(cpu[name])), "cpu_s_windows": cpu[name],
          "ratio_to_torch": paired(wall, name, ref) if versus else None,
          "cpu_ratio_to_torch": paired(cpu, name, ref) if versus else None,
          **case.measured}


def measure_batch(batch_size: int, dtypes: Sequence[str], settings: Sequence[str],
                  frameworks: Sequence[str], mesh, twin, device: str | None, *,
                  image_size: int, repeats: int, window_steps: int
                  ) -> tuple[list[dict[str, Any]], float | None]:
  """(rows, other load) at one batch size: every case in the same interleaved windows."""
  cases: dict[tuple[str, str, str], train_step.Case] = {}
  for dtype in dtypes:
    for setting in settings:
      config = train_step.benchmark_config(MODEL, setting, batch_size=batch_size, dtype=dtype,
                                           image_shape=(image_size,) * 2 + (3,))
      for fw in frameworks:
        cases[dtype, fw, setting] = (torch_case(twin, setting, config, device) if fw == "torch"
                                     else jax_case(fw, setting, config, mesh))
  with OtherLoad() as load:
    wall, cpu = train_step.time_interleaved(list(cases.values()), repeats, window_steps)
  rows = [framework_row(fw, d, s, batch_size, case, wall, cpu)
          for (d, fw, s), case in cases.items()]
  return rows, load.share


def check_names(kind: str, names: Sequence[str], allowed: Sequence[str]) -> None:
  bad = [n for n in names if n not in allowed]
  if bad or not names:
    raise ValueError(f"--{kind}={','.join(names)} is not allowed; allowed: a list of "
                     f"{list(allowed)}")


def run(batch_sizes: Sequence[int], settings: Sequence[str] = SETTINGS,
        frameworks: Sequence[str] = ("jax", "torch"), *, dtypes: Sequence[str] = ("float32",),
        repeats: int = 5, window_steps: int = 3, threads: int | None = None,
        image_size: int = 32, command: str = "") -> dict[str, Any]:
  """Measures every batch size, dtype and setting; returns the results (see the module
  docstring)."""
  check_names("settings", settings, SETTINGS)
  check_names("frameworks", frameworks, FRAMEWORKS)
  check_names("dtypes", dtypes, DTYPES)
  frameworks = [fw for fw in FRAMEWORKS if fw in frameworks]
  threads = threads or available_cores()
  twin = import_torch_twin(threads) if "torch" in frameworks else None
  device = None if twin is None else torch_device(twin)
  mesh = parallel.make_mesh(1)
  jax_device = mesh.devices.flat[0]
  load = os.getloadavg()
  rows, other = [], {}
  for b in batch_sizes:
    r, other[str(b)] = measure_batch(b, dtypes, settings, frameworks, mesh, twin, device,
                                     image_size=image_size, repeats=repeats,
                                     window_steps=window_steps)
    rows += r
  return {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "affinity": available_cores(),
                  "load_average_at_start": [round(x, 2) for x in load],
                  "other_processes_cpu_share": other,
                  "jax_device": f"{jax_device.platform}: {jax_device.device_kind}",
                  "torch_device": None if twin is None else torch_device_name(twin, device)},
      "jax": jax.__version__, "flax": flax.__version__,
      "torch": None if twin is None else twin.torch.__version__,
      "torch_threads": None if twin is None else twin.torch.get_num_threads(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "xla_cpu": xla_cpu.compiler_options(),
      "command": command,
      "settings": {"model": MODEL, "batch_sizes": list(batch_sizes), "settings": list(settings),
                   "frameworks": list(frameworks), "dtypes": list(dtypes), "repeats": repeats,
                   "window_steps": window_steps, "warmup_steps": 1, "image_size": image_size},
      "rows": rows}


def torch_device_name(twin, device: str) -> str:
  if device == "cpu":
    return "cpu"
  return f"{device}: {twin.torch.cuda.get_device_name(device)}"


def _ratio(r: dict | None) -> str:
  return "n/a" if r is None else f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def _share(share: float | None) -> str:
  return "n/a" if share is None else f"{100 * share:.0f}%"


def format_table(results: dict[str, Any]) -> str:
  """Markdown: the header, one row per batch size, setting and framework, the notes."""
  s, m = results["settings"], results["machine"]
  other = ", ".join(f"batch {b}: {_share(v)}" for b, v in m["other_processes_cpu_share"].items())
  lines = [
      f"JAX vs PyTorch training step, {results['date']}: {m['cpu']}, {m['affinity']} of "
      f"{m['cpus']} CPUs, load average {m['load_average_at_start'][0]:.1f} at start, other "
      f"processes' CPU share while timing: {other}; JAX {results['jax']} on "
      f"{m['jax_device']}, Flax {results['flax']}, PyTorch {results['torch'] or 'n/a'} on "
      f"{m['torch_device'] or 'n/a'} ({results['torch_threads'] or 'n/a'} CPU threads); "
      f"XLA_FLAGS={results['xla_flags']!r}; library XLA:CPU options {results['xla_cpu']}.", "",
      f"Command: `{results['command']}`", "",
      f"{s['model']}, {s['image_size']}x{s['image_size']}x3; median of "
      f"{s['repeats']} interleaved windows of {s['window_steps']} step(s) after "
      f"{s['warmup_steps']} warm-up step; vs PyTorch: median (range) over the repeats of the "
      "ratio of the two windows in the same repeat.", "",
      "| batch | dtype | setting | framework | ms/step | vs PyTorch | CPU ms/step "
      "| vs PyTorch (CPU time) | compile (s) |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    compile_s = f"{r['lower_s'] + r['compile_s']:.1f}" if "compile_s" in r else "n/a"
    lines.append(
        f"| {r['batch_size']} | {r['dtype']} | {r['setting']} | {r['framework']} "
        f"| {1e3 * r['step_s']:.1f} "
        f"| {_ratio(r['ratio_to_torch'])} | {1e3 * r['cpu_s']:.1f} "
        f"| {_ratio(r['cpu_ratio_to_torch'])} | {compile_s} |")
  lines += ["", "jax: the library's step (train.make_train_step: augmentation, model, loss, "
            "regulariser, SGD), compiled with `xla_cpu.compiler_options()` (empty off the "
            "CPU); jax_xla_defaults: the same step with XLA's own defaults; torch: "
            "benchmarks/torch_twin.py, eager, NCHW, no augmentation; bfloat16: mixed precision "
            "with float32 master weights in both. CPU ms/step: this process's CPU time over "
            "the window (all threads; on a GPU the host's alone). Other processes' CPU share: "
            "the machine's busy CPU time less this process's, over the CPUs' time, while the windows ran (a shared machine's load "
            "slows PyTorch's OpenMP threads far more than XLA's)."]
  return "\n".join(lines)


def parse(argv: Sequence[str]) -> None:
  """Parses argv (without the program name) into FLAGS; flags.Error on a bad flag."""
  FLAGS.unparse_flags()
  FLAGS([PROG, *argv])


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    parse(argv)
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  except (flags.Error, ValueError) as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2

  if "torch" in FLAGS.frameworks:
    # On a GPU JAX would take 75% of the device's memory before PyTorch asks for any.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

  def measure():
    return run(batch_sizes, FLAGS.settings, FLAGS.frameworks, dtypes=FLAGS.dtypes,
               repeats=FLAGS.repeats, window_steps=FLAGS.window_steps, threads=FLAGS.threads,
               image_size=FLAGS.image_size, command=f"{PROG} {shlex.join(argv)}".strip())

  return run_and_report(PROG, measure, format_table, FLAGS.json)


if __name__ == "__main__":
  sys.exit(main())
