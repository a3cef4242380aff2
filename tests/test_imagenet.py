"""The ImageNet experiment: its configs, and the trainer on a streamed dataset.

The configs stream imagenet2012, which cannot be had here; their tiny variants
stream a generated JPEG dataset (`datasets.synthetic_jpeg`) through the same
pipeline (`streaming`), trainer and checkpoints.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import biper_imagenet, fda_resnet18_imagenet, recipes
from fda_biper_jax import models, train

tfds = pytest.importorskip("tensorflow_datasets")
from fda_biper_jax.data.datasets import synthetic_jpeg  # noqa: E402  (needs tfds)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = synthetic_jpeg.dataset_name(32, 12, height=(40, 60), width=(40, 60), num_classes=10)

CONFIGS = {
    "biper resnet18 stage1": biper_imagenet.get_config("resnet18,stage1"),
    "biper resnet18 stage2": biper_imagenet.get_config("resnet18,stage2"),
    "biper resnet34 stage1": biper_imagenet.get_config("resnet34,stage1"),
    "biper resnet34 stage2": biper_imagenet.get_config("resnet34,stage2"),
    "fda resnet18": fda_resnet18_imagenet.get_config(),
}
# With the learned per-channel scale: BiPer's README gives 11,694,376 for
# ResNet-18 and 21.81M for ResNet-34 (tests/test_models.py).
PARAMS = {"resnet18": 11_694_376, "resnet34": 21_806_248}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_follow_the_papers_and_build_their_models(name):
  c = CONFIGS[name]
  assert (c.dataset, c.input, c.stream.image_size, c.stream.eval_resize) == (
      "imagenet2012", "stream", 224, 256)
  check = c.copy_and_resolve_references()
  check.init_from = ""  # stage 1's workdir does not exist here
  train.validate(check)
  model = models.create(c.model, 1000, **train.quantization(c))
  image = np.zeros((1, 224, 224, 3), np.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))
  n = sum(x.size for x in jax.tree.leaves(shapes["params"]))
  if name.startswith("biper"):
    stage = name.split()[-1]
    assert (c.num_epochs, c.optimizer.learning_rate, c.optimizer.weight_decay,
            c.optimizer.warmup_epochs) == recipes.IMAGENET_BIPER_STAGES[stage]
    # The public ImageNet code: no sin^2 regulariser, no stage-2 warm-up, decay on conv /
    # fc parameters only, BatchNorm scales from 1e-8.
    assert c.quantization.kernel_quantizer["tau"] == 0.0
    assert c.optimizer.warmup_epochs == (5.0 if stage == "stage1" else 0.0)
    assert c.optimizer.weight_decay_mask == recipes.IMAGENET_DECAY_MASK
    assert c.bn_scale_init == 1e-8
    assert c.batch_size == 512 and c.optimizer.name == "sgd"
    assert c.quantization.kernel_quantizer["name"] == (
        "biper_sine" if stage == "stage1" else "biper")
    assert c.init_from == ("" if stage == "stage1" else f"runs/biper_{c.model}_stage1")
    assert n == PARAMS[c.model]
  else:
    assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay) == (
        "adam", 1e-3, 0.0)
    assert c.quantization.kernel_quantizer["name"] == "fda"
    assert c.quantization.kernel_quantizer["noise"] and c.quantization.input_quantizer["noise"]


def test_biper_imagenet_decays_conv_and_fc_but_not_batch_norm_nor_downsample():
  c = biper_imagenet.get_config("resnet18,stage1")
  model = models.create("resnet18", 1000, **train.quantization(c))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 64, 64, 3)),
                                             train=False))["params"]
  mask = train.decay_mask(c.optimizer.weight_decay_mask)(shapes)
  decayed = {"/".join(str(k.key) for k in p) for p, m in
             jax.tree_util.tree_leaves_with_path(mask) if m}
  everything = {"/".join(str(k.key) for k in p) for p, _ in
                jax.tree_util.tree_leaves_with_path(shapes)}
  assert "stem/conv/kernel" in decayed and "head/fc/kernel" in decayed
  assert "head/fc/bias" in decayed and "block0/unit1/main/conv/scale" in decayed
  assert "block2/unit1/downsample/conv/kernel" in everything - decayed
  assert not any("/bn/" in p for p in decayed)
  # every binary conv's kernel and learned scale (16 + 16), stem, fc kernel and bias
  assert len(decayed) == 16 * 2 + 1 + 2


def test_batch_norm_scale_init_is_a_config_choice():
  model = models.create("tiny_cnn", 4, bn_scale_init=1e-8)
  v = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
  scales = [a for p, a in jax.tree_util.tree_leaves_with_path(v["params"])
            if p[-1].key == "scale"]
  assert len(scales) == 4 and all(np.all(np.asarray(a) == np.float32(1e-8)) for a in scales)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder(NAME, data_dir=path).download_and_prepare()
  return path


def tiny_variant(config, data_dir, **overrides):
  """The recipe at 32 px on the generated JPEGs: 2 steps of batch 16."""
  c = config.copy_and_resolve_references()
  c.dataset, c.data_dir, c.init_from = NAME, data_dir, ""
  c.stream.image_size, c.stream.eval_resize = 32, 36
  c.batch_size, c.eval_batch_size, c.num_epochs = 16, 8, 1
  c.optimizer.warmup_epochs = 0.0
  c.log_every_steps = c.checkpoint_every_steps = 1
  c.tensorboard = False
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def test_tiny_variant_trains_and_evaluates(data_dir, tmp_path):
  """BiPer's resnet18 recipe, streamed; FDA's runs through the command line below."""
  c = tiny_variant(CONFIGS["biper resnet18 stage1"], data_dir, num_devices=1)
  out = train.train_and_evaluate(c, str(tmp_path))
  assert out["steps"] == 2
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  losses = [r["loss"] for r in records if r["kind"] == "train"]
  assert len(losses) == 2 and all(np.isfinite(losses))
  (ev,) = [r for r in records if r["kind"] == "eval"]
  assert 0.0 <= ev["accuracy"] <= 1.0 and ev["accuracy"] == out["final_eval_accuracy"]
  assert os.path.isdir(tmp_path / "checkpoints" / "2")


def test_streamed_run_resumes_exactly(data_dir, tmp_path):
  """Resumed from its step-1 checkpoint (mid-epoch), a streamed run ends where the
  uninterrupted one does: the stream restarts its epoch at the checkpoint's step."""
  c = tiny_variant(CONFIGS["biper resnet18 stage1"], data_dir, model="tiny_cnn",
                   num_epochs=2)
  whole = train.train_and_evaluate(c, str(tmp_path / "whole"))
  shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
  for step in os.listdir(tmp_path / "resumed" / "checkpoints"):
    if step.isdigit() and int(step) > 1:
      shutil.rmtree(tmp_path / "resumed" / "checkpoints" / step)
  resumed = train.train_and_evaluate(c, str(tmp_path / "resumed"))
  assert whole["steps"] == resumed["steps"] == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(whole["state"].params),
               jax.device_get(resumed["state"].params))


def test_command_line(data_dir, tmp_path):
  workdir = str(tmp_path / "cli")
  run = subprocess.run(
      [sys.executable, "-m", "experiments.imagenet",
       "--config=experiments/configs/fda_resnet18_imagenet.py", f"--workdir={workdir}",
       f"--config.dataset={NAME}", f"--config.data_dir={data_dir}", "--config.model=tiny_cnn",
       "--config.stream.image_size=32", "--config.stream.eval_resize=36",
       "--config.batch_size=16", "--config.num_epochs=1", "--config.tensorboard=False"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "done: best eval accuracy" in run.stdout


def test_unknown_streamed_dataset_stops_with_one_line(data_dir, tmp_path):
  c = tiny_variant(CONFIGS["fda resnet18"], data_dir, dataset="no_such_dataset")
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert "no_such_dataset" in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()
