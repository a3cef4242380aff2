"""The benchmarks run end to end on tiny configurations; a bad flag is one line."""

import json
import os
import subprocess
import sys

import jax
import pytest

from benchmarks import train_step
from fda_biper_jax import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROW_KEYS = {"model", "quantizer", "image_shape", "batch_size", "quantization", "compute_dtype",
            "init_s", "lower_s", "compile_s", "step_s", "step_s_windows", "images_per_s", "cpu_s",
            "cpu_s_windows", "ratio_to_fp", "cpu_ratio_to_fp", "target", "within_target",
            "cpu_within_target", "model_macs_per_example", "model_flops_per_step",
            "model_flops_per_s", "xla_flops_per_step", "xla_transcendentals_per_step",
            "xla_bytes_accessed_per_step", "xla_memory_bytes", "input_share",
            "peak_flops_share", "roofline_s", "roofline_bound"}
PIPELINE_KEYS = {"model", "image_shape", "batch_size", "batch_s", "images_per_s",
                 "fastest_step_images_per_s", "speedup_over_step", "target", "within_target"}


def test_train_step_benchmark_writes_table_and_json(tmp_path, capsys):
  path = tmp_path / "train_step.json"
  argv = ["--models=tiny_cnn", "--quantizers=biper", "--image_shape=8,8,3", "--batch_size=16",
          "--repeats=1", "--window_steps=2", "--peak_tflops=0.5", "--peak_tbps=0.01",
          f"--json={path}"]
  assert train_step.main(argv) == 0

  results = json.loads(path.read_text())
  assert {"date", "machine", "backend", "device", "num_devices", "jax", "flax", "command",
          "settings", "device_peak_bytes", "peak", "rows", "pipeline"} <= set(results)
  assert results["peak"] == {"tflops": 0.5, "tbps": 0.01, "table_entry": None}
  assert results["num_devices"] == 8 and results["command"].endswith(" ".join(argv))
  rows = {r["quantizer"]: r for r in results["rows"]}
  assert list(rows) == ["identity", "biper"]  # the twin is always measured, first
  for r in rows.values():
    assert set(r) == ROW_KEYS
    assert r["step_s"] > 0 and r["images_per_s"] > 0 and r["xla_flops_per_step"] > 0
    # Per device (8 here), against the peaks given on the command line.
    assert r["peak_flops_share"] == pytest.approx(r["model_flops_per_s"] / 8 / 0.5e12)
    # The larger FLOP count: XLA's leaves out library-call convolutions (cuDNN on a GPU).
    flops = max(r["xla_flops_per_step"], r["model_flops_per_step"])
    compute = flops / 8 / 0.5e12
    memory = r["xla_bytes_accessed_per_step"] / 8 / 0.01e12
    assert r["roofline_s"] == pytest.approx(max(compute, memory))
    assert r["roofline_bound"] == ("compute" if compute >= memory else "memory")
  assert rows["identity"]["ratio_to_fp"] == rows["identity"]["cpu_ratio_to_fp"] == 1.0
  assert rows["identity"]["target"] is None
  assert rows["biper"]["target"] == train_step.CPU_TARGET
  assert rows["biper"]["quantization"]["kernel_quantizer"] == {"name": "biper", "omega0": 20.0,
                                                               "tau": 0.0468}
  (pipeline,) = results["pipeline"]
  assert set(pipeline) == PIPELINE_KEYS and pipeline["images_per_s"] > 0

  lines = capsys.readouterr().out.splitlines()
  header = lines.index(next(line for line in lines if line.startswith("| model | quantizer |")))
  columns = lines[header].count("|")
  assert lines[header + 1] == "|---" * (columns - 1) + "|"
  assert [line.split(" | ")[:2] for line in lines[header + 2:header + 4]] == [
      ["| tiny_cnn", "identity"], ["| tiny_cnn", "biper"]]
  assert all(line.count("|") == columns for line in lines[header + 2:header + 4])
  assert any(line.startswith("| tiny_cnn | 8x8x3 |") for line in lines)
  text = "\n".join(lines)
  assert "not reported by the cpu backend" in text
  assert "0.5 TFLOP/s" in text and "0.01 TB/s" in text
  biper = lines[header + 3].split(" | ")
  assert biper[10] == f"{100 * rows['biper']['peak_flops_share']:.1f}%"
  assert biper[13] == f"{1e3 * rows['biper']['roofline_s']:.2f} {rows['biper']['roofline_bound']}"


@pytest.mark.parametrize("kind, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", (989.4, 3.35)),   # SXM5
    ("NVIDIA H100 PCIe", "bfloat16", (756.0, 2.0)),
    ("NVIDIA H200", "bfloat16", (989.4, 4.8)),
    ("NVIDIA A100-SXM4-40GB", "bfloat16", (312.0, 1.555)),
    ("TPU v5 lite", "bfloat16", (197.0, 0.819)),
    ("TPU v5", "bfloat16", (459.0, 2.765)),
    ("TPU v6 lite", "bfloat16", (918.0, 1.64)),
    ("NVIDIA H100 80GB HBM3", "float32", (None, 3.35)),     # the table holds bf16 peaks only
    ("cpu", "bfloat16", (None, None)),
])
def test_device_peak_looks_up_the_device_kind(kind, dtype, expected):
  peak = train_step.device_peak(kind, dtype)
  assert (peak["tflops"], peak["tbps"]) == expected
  assert (peak["table_entry"] is None) == (kind == "cpu")


def test_device_peak_flags_override_the_table_and_roofline_names_the_bound():
  peak = train_step.device_peak("NVIDIA H100 80GB HBM3", "float32", tflops=400.0)
  assert (peak["tflops"], peak["tbps"]) == (400.0, 3.35)
  assert train_step.device_peak("cpu", "float32", tflops=1.0, tbps=0.1)["tbps"] == 0.1
  assert train_step.roofline(4e12, 1e9, peak) == (pytest.approx(0.01), "compute")
  assert train_step.roofline(4e9, 3.35e12, peak) == (pytest.approx(1.0), "memory")
  assert train_step.roofline(8e12, 2e9, peak, num_devices=2) == (pytest.approx(0.01), "compute")
  assert train_step.roofline(4e9, None, peak) == (None, None)
  assert train_step.roofline(4e9, 1e9, train_step.device_peak("cpu", "bfloat16")) == (None, None)


def test_roofline_flops_take_the_larger_count():
  """On a GPU XLA's count misses the cuDNN convolutions (resnet20, batch 256, H200: 1.7 of
  the model's 62 GFLOP); on the CPU it counts them and its own extra work."""
  assert train_step.roofline_flops({"xla_flops_per_step": 1.7e9,
                                    "model_flops_per_step": 62e9}) == 62e9
  assert train_step.roofline_flops({"xla_flops_per_step": 30e9,
                                    "model_flops_per_step": 24e9}) == 30e9
  assert train_step.roofline_flops({"xla_flops_per_step": None,
                                    "model_flops_per_step": 24e9}) == 24e9


@pytest.mark.parametrize("flag", ["--peak_tflops", "--peak_tbps"])
@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "fast"])
def test_bad_peak_is_one_line_error_before_any_work(flag, value, capsys):
  assert train_step.main([f"{flag}={value}"]) == 2
  (err,) = capsys.readouterr().err.strip().splitlines()
  assert err.startswith("python -m benchmarks.train_step: error: ")
  assert f"{value!r} is not a positive finite number" in err and flag in err


INPUT_ROW_KEYS = {"mode", "dtype", "batch_size", "images_per_s", "images_per_s_windows",
                  "images_per_s_per_core", "images_per_cpu_s", "images_per_cpu_s_windows",
                  "first_batch_s", "batch_bytes", "cores_for_target"}


def _command(module, argv):
  """`python -m module *argv` in a fresh interpreter: (exit status, stdout, stderr)."""
  proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  return proc.returncode, proc.stdout, proc.stderr


def test_input_pipeline_benchmark_writes_table_and_json(tmp_path):
  path = tmp_path / "input_pipeline.json"
  argv = ["--num_images=20", "--num_eval_images=7", "--height=40,50", "--width=40,60",
          "--image_size=32", "--batch_size=8", "--windows=2", "--window_batches=1",
          "--warmup_batches=1", "--target=1000", f"--data_dir={tmp_path / 'tfds'}",
          f"--json={path}"]
  status, out, err = _command("benchmarks.input_pipeline", argv)
  assert status == 0, err[-2000:]

  results = json.loads(path.read_text())
  assert {"date", "machine", "cores", "tensorflow", "command", "settings", "dataset",
          "rows"} <= set(results)
  assert results["command"].endswith(" ".join(argv)) and results["cores"] >= 1
  dataset = results["dataset"]
  assert (dataset["num_train"], dataset["num_eval"]) == (20, 7)
  assert 40 <= dataset["mean_height"] <= 50 and 40 <= dataset["mean_width"] <= 60
  assert dataset["mean_jpeg_bytes"] > 0
  rows = results["rows"]
  assert [(r["mode"], r["dtype"]) for r in rows] == [
      ("train", "float32"), ("train", "bfloat16"), ("eval", "float32"), ("eval", "bfloat16")]
  for r in rows:
    assert set(r) == INPUT_ROW_KEYS and r["batch_size"] == 8
    assert r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0
    assert len(r["images_per_s_windows"]) == len(r["images_per_cpu_s_windows"]) == 2
    assert r["images_per_s_per_core"] == r["images_per_s"] / results["cores"]
    assert r["cores_for_target"] == 1000 / r["images_per_cpu_s"]
    assert r["batch_bytes"] == 8 * 32 * 32 * 3 * (4 if r["dtype"] == "float32" else 2)

  lines = out.splitlines()
  header = lines.index(next(line for line in lines if line.startswith("| pipeline | dtype |")))
  columns = lines[header].count("|")
  assert lines[header + 1] == "|---" * (columns - 1) + "|"
  body = lines[header + 2:header + 6]
  assert [line.split(" | ")[:2] for line in body] == [
      ["| train", "float32"], ["| train", "bfloat16"], ["| eval", "float32"],
      ["| eval", "bfloat16"]]
  assert all(line.count("|") == columns for line in body)


def test_compare_revisions_times_two_versions_in_one_process(tmp_path):
  """HEAD against the working tree, on tiny_cnn: both steps build and are timed."""
  path = tmp_path / "compare.json"
  argv = ["--base=HEAD", "--models=tiny_cnn", "--quantizers=biper", "--batch_size=16",
          "--repeats=2", "--window_steps=1", f"--json={path}"]
  status, out, err = _command("benchmarks.compare_revisions", argv)
  assert status == 0, err[-2000:]
  (row,) = json.loads(path.read_text())["rows"]
  assert row["model"] == "tiny_cnn" and row["quantizer"] == "biper"
  assert row["base_wall_ms"] > 0 and row["current_wall_ms"] > 0 and len(row["wall_ratios"]) == 2
  assert row["base"]["xla_flops_per_step"] > 0 and row["current"]["xla_flops_per_step"] > 0
  assert "| tiny_cnn | biper |" in out
  status, _, err = _command("benchmarks.compare_revisions",
                            ["--base=no-such-revision", "--models=tiny_cnn"])
  assert status == 2 and len(err.strip().splitlines()) == 1
  assert "--base='no-such-revision': git archive failed" in err


@pytest.mark.parametrize("module, flag, allowed", [
    ("benchmarks.input_pipeline", "--height=50,40", "MIN,MAX with 1 <= MIN <= MAX"),
    ("benchmarks.input_pipeline", "--target=inf", "a positive finite number"),
    ("benchmarks.input_pipeline", "--dtypes=int8", "comma-separated names from float32, "
                                                   "bfloat16"),
    ("benchmarks.inference", "--batch_sizes=1,0", "comma-separated positive integers"),
    ("benchmarks.inference", "--models=resnet99", "comma-separated names from resnet18_cifar, "),
    ("benchmarks.compare_revisions", "--repeats=0", "a positive integer"),
])
def test_a_bad_flag_is_one_line_error_before_any_work(module, flag, allowed):
  status, out, err = _command(module, ["--base=HEAD", flag] if "compare" in module else [flag])
  assert status == 2 and out == ""
  (line,) = err.strip().splitlines()
  assert line.startswith(f"python -m {module}: error: {flag} is not allowed; allowed: {allowed}")


VS_ROW_KEYS = {"setting", "batch_size", "dtype", "framework", "step_s", "step_s_windows", "cpu_s",
               "cpu_s_windows", "ratio_to_torch", "cpu_ratio_to_torch"}


def test_vs_pytorch_jax_half_runs_without_torch(tmp_path, capsys, monkeypatch):
  """The JAX half alone, with torch made unimportable: the library's step and the same step
  with XLA's defaults, in one table and JSON; asking for the torch half is one line."""
  import sys

  from benchmarks import vs_pytorch

  monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ModuleNotFoundError
  monkeypatch.delitem(sys.modules, "benchmarks.torch_twin", raising=False)
  path = tmp_path / "vs_pytorch.json"
  argv = ["--frameworks", "jax,jax_xla_defaults", "--batch_sizes", "8", "--image_size", "8",
          "--settings", "biper", "--dtypes", "bfloat16", "--repeats", "2", "--window_steps", "1",
          "--json", str(path)]
  assert vs_pytorch.main(argv) == 0

  results = json.loads(path.read_text())
  assert results["torch"] is None and results["command"].endswith(" ".join(argv))
  assert results["settings"]["frameworks"] == ["jax", "jax_xla_defaults"]
  assert results["xla_cpu"] == xla_cpu.compiler_options()
  assert list(results["machine"]["other_processes_cpu_share"]) == ["8"]
  rows = results["rows"]
  assert results["settings"]["dtypes"] == ["bfloat16"]
  assert results["machine"]["jax_device"] == f"cpu: {jax.devices()[0].device_kind}"
  assert results["machine"]["torch_device"] is None
  assert [(r["framework"], r["setting"], r["batch_size"], r["dtype"]) for r in rows] == [
      ("jax", "biper", 8, "bfloat16"), ("jax_xla_defaults", "biper", 8, "bfloat16")]
  for r in rows:
    assert VS_ROW_KEYS <= set(r) and r["step_s"] > 0 and r["cpu_s"] > 0
    assert r["compute_dtype"] == "bfloat16"
    assert len(r["step_s_windows"]) == 2 and r["ratio_to_torch"] is None
    assert r["compile_s"] > 0 and r["quantization"]["kernel_quantizer"]["name"] == "biper"

  lines = capsys.readouterr().out.splitlines()
  header = lines.index(next(line for line in lines
                            if line.startswith("| batch | dtype | setting |")))
  columns = lines[header].count("|")
  body = lines[header + 2:header + 4]
  assert [line.split(" | ")[:4] for line in body] == [
      ["| 8", "bfloat16", "biper", "jax"], ["| 8", "bfloat16", "biper", "jax_xla_defaults"]]
  assert all(line.count("|") == columns and " n/a " in line for line in body)

  assert vs_pytorch.main(["--frameworks", "jax,torch", "--json", str(path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "torch, which is not installed" in err[0]

  written = path.read_text()
  assert vs_pytorch.main(["--frameworks", "jax", "--dtypes", "int8", "--json", str(path)]) == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line == ("python -m benchmarks.vs_pytorch: error: --dtypes=int8 is not allowed; "
                  "allowed: a list of ['float32', 'bfloat16']")
  assert path.read_text() == written


def test_torch_twin_steps_in_float32_and_bfloat16():
  """Where torch is installed (the `bench` extra; CI has none): the twin's BiPer step in
  both dtypes moves the weights, bfloat16 runs the convolutions under autocast, and a bad
  dtype is one line."""
  torch = pytest.importorskip("torch")
  from benchmarks import torch_twin

  config = train_step.benchmark_config("resnet20", "biper", batch_size=4, dtype="float32",
                                       image_shape=(8, 8, 3))
  quantization = train_step.train.quantization(config)
  kwargs = dict(batch_size=4, image_size=8, learning_rate=0.1, momentum=0.9,
                weight_decay=5e-4)
  for dtype, conv_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
    step = torch_twin.TrainStep(quantization, dtype=dtype, **kwargs)
    before = step.model.units[0].conv.weight.detach().clone()
    step(0)
    step.wait()
    assert not torch.equal(before, step.model.units[0].conv.weight)
    with step.autocast():
      assert torch.nn.functional.conv2d(step.images, step.model.stem.weight).dtype == conv_dtype
  with pytest.raises(ValueError, match=r"^dtype='float16' is not allowed; allowed: "
                                       r"\['float32', 'bfloat16'\]$"):
    torch_twin.TrainStep(quantization, dtype="float16", **kwargs)

