"""The training-step benchmark runs end to end on a tiny configuration."""

import json

from benchmarks import train_step

ROW_KEYS = {"model", "quantizer", "image_shape", "batch_size", "quantization", "compute_dtype",
            "lower_s", "compile_s", "step_s", "step_s_windows", "images_per_s", "cpu_s",
            "cpu_s_windows", "ratio_to_fp", "cpu_ratio_to_fp", "target", "within_target",
            "cpu_within_target", "model_macs_per_example", "model_flops_per_step",
            "model_flops_per_s", "xla_flops_per_step", "xla_transcendentals_per_step",
            "xla_bytes_accessed_per_step", "xla_memory_bytes", "input_share"}
PIPELINE_KEYS = {"model", "image_shape", "batch_size", "batch_s", "images_per_s",
                 "fastest_step_images_per_s", "speedup_over_step", "target", "within_target"}


def test_train_step_benchmark_writes_table_and_json(tmp_path, capsys):
  path = tmp_path / "train_step.json"
  argv = ["--models", "tiny_cnn", "--quantizers", "biper", "--image_shape", "8,8,3",
          "--batch_size", "16", "--repeats", "1", "--window_steps", "2", "--json", str(path)]
  assert train_step.main(argv) == 0

  results = json.loads(path.read_text())
  assert {"date", "machine", "backend", "device", "num_devices", "jax", "flax", "command",
          "settings", "device_peak_bytes", "rows", "pipeline"} <= set(results)
  assert results["num_devices"] == 8 and results["command"].endswith(" ".join(argv))
  rows = {r["quantizer"]: r for r in results["rows"]}
  assert list(rows) == ["identity", "biper"]  # the twin is always measured, first
  for r in rows.values():
    assert set(r) == ROW_KEYS
    assert r["step_s"] > 0 and r["images_per_s"] > 0 and r["xla_flops_per_step"] > 0
  assert rows["identity"]["ratio_to_fp"] == rows["identity"]["cpu_ratio_to_fp"] == 1.0
  assert rows["identity"]["target"] is None
  assert rows["biper"]["target"] == train_step.CPU_TARGET
  assert rows["biper"]["quantization"]["kernel_quantizer"] == {"name": "biper", "omega0": 20.0}
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
  assert "not reported by the cpu backend" in "\n".join(lines)


INPUT_ROW_KEYS = {"mode", "dtype", "batch_size", "images_per_s", "images_per_s_windows",
                  "images_per_s_per_core", "images_per_cpu_s", "images_per_cpu_s_windows",
                  "first_batch_s", "batch_bytes", "cores_for_target"}


def test_input_pipeline_benchmark_writes_table_and_json(tmp_path, capsys):
  from benchmarks import input_pipeline

  path = tmp_path / "input_pipeline.json"
  argv = ["--num_images", "20", "--num_eval_images", "7", "--height", "40,50", "--width", "40,60",
          "--image_size", "32", "--batch_size", "8", "--windows", "2", "--window_batches", "1",
          "--warmup_batches", "1", "--target", "1000", "--data_dir", str(tmp_path / "tfds"),
          "--json", str(path)]
  assert input_pipeline.main(argv) == 0

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

  lines = capsys.readouterr().out.splitlines()
  header = lines.index(next(line for line in lines if line.startswith("| pipeline | dtype |")))
  columns = lines[header].count("|")
  assert lines[header + 1] == "|---" * (columns - 1) + "|"
  body = lines[header + 2:header + 6]
  assert [line.split(" | ")[:2] for line in body] == [
      ["| train", "float32"], ["| train", "bfloat16"], ["| eval", "float32"],
      ["| eval", "bfloat16"]]
  assert all(line.count("|") == columns for line in body)
