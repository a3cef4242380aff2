"""What a run leaves to watch and compare: config.json, metrics.jsonl, TensorBoard.

A workdir (a local path or any `etils.epath` URI, e.g. gs://) receives:

* `config.json`: the resolved training config, written before the first step;
* `metrics.jsonl`: one JSON record per line, `{"kind": "train" | "eval" |
  "layers", "step", "epoch", ...}`: train records every `log_every_steps`
  (loss, accuracy, learning rate, scheduled method values, gradient norms,
  `window_s` the wall seconds since the previous one), eval and layers
  records at each evaluation (eval: accuracy, loss, `elapsed_s` the wall
  seconds since this process began training, compilation included, and
  `time` the Unix time); a
  resumed run first drops the records of the steps after its checkpoint (it
  takes them again), so each step is logged once;
* `tensorboard/`: event files written with tensorboardX (the writer needs
  neither TensorFlow nor a running TensorBoard, so it works with the core
  install; clu's writer would pull in TensorFlow): every scalar of the
  records (`train/*`, `eval/*`, the scheduled method values, `grad_norm/<kernel>`),
  the per-layer statistics (`layers/<stat>/<layer>`: Laplace b, QE, sign
  flips), latent-weight histograms of every binarized layer
  (`weights/<layer>`) and, when the run ends, its hyperparameters against
  its final and best accuracy (`tensorboard/hparams`, TensorBoard's HPARAMS
  tab). A resumed run purges the events after its checkpoint.

Only process 0 writes.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from fda_biper_jax import analysis

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested mapping."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flat(v, key + "/"))
    else:
      out[key] = v
  return out


def hparams(config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
  """The config's leaves as TensorBoard hyperparameters (lists and None as text)."""
  return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
          for k, v in flat(config).items()}


def read(workdir) -> list[dict[str, Any]]:
  """The records of WORKDIR/metrics.jsonl, in order; ValueError (one line) when the file is
  missing or a line is not JSON."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    raise ValueError(f"{path} does not exist; allowed: a training run's workdir")
  records = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} line {i} is not JSON ({e.msg})") from None
  return records


def _scalar(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def scalar_tags(record: Mapping[str, Any]) -> dict[str, float]:
  """The TensorBoard scalars of a metrics record, by tag.

  train / eval: `<kind>/<key>` for each number, `grad_norm/<kernel>` for the
  per-kernel gradient norms; layers: `layers/sign_flip_share` and
  `layers/<stat>/<layer path>`, so that one chart holds one statistic of
  every layer.
  """
  kind = record["kind"]
  out = {f"{kind}/{k}": float(v) for k, v in record.items()
         if _scalar(v) and k not in ("step", "epoch", "time")}
  for path, v in record.get("grad_norms", {}).items():
    out[f"grad_norm/{path}"] = float(v)
  if kind == "layers":
    for path, stats in record.get("layers", {}).items():
      for stat, v in stats.items():
        if _scalar(v):
          out[f"layers/{stat}/{path}"] = float(v)
  return out


class RunLog:
  """config.json, metrics.jsonl and TensorBoard events of one workdir (see the module doc)."""

  def __init__(self, workdir, *, tensorboard: bool = True, resume_step: int | None = None):
    self.root = epath.Path(workdir)
    self.path = self.root / METRICS_FILE
    self.primary = jax.process_index() == 0
    self.tb = None
    if resume_step is not None:
      self.truncate_after(resume_step)
    if tensorboard and self.primary:
      import tensorboardX  # noqa: PLC0415 -- only when TensorBoard files are wanted
      self.tb = tensorboardX.SummaryWriter(
          str(self.root / TENSORBOARD_DIR),
          purge_step=None if resume_step is None else resume_step + 1)

  def write_config(self, config: Mapping[str, Any]) -> None:
    """Writes config.json (the resolved config, sorted keys)."""
    if self.primary:
      self.root.mkdir(parents=True, exist_ok=True)
      (self.root / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

  def truncate_after(self, step: int) -> None:
    """Keeps the records of steps <= step (a resumed run logs the later ones again) and
    drops a line a killed run left half-written."""
    if not self.primary or not self.path.exists():
      return
    kept = []
    for line in self.path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and record.get("step", 0) <= step:
        kept.append(line + "\n")
    self.path.write_text("".join(kept))

  def write(self, record: dict[str, Any], histograms: Mapping[str, Any] | None = None) -> None:
    """Appends `record` to metrics.jsonl and its scalars (`scalar_tags`) and
    `histograms` ({tag: array}) to TensorBoard at record['step']."""
    if not self.primary:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      step = int(record["step"])
      for tag, v in scalar_tags(record).items():
        self.tb.add_scalar(tag, v, step)
      for tag, values in (histograms or {}).items():
        self.tb.add_histogram(tag, np.asarray(values, np.float32).ravel(), step)
      self.tb.flush()

  def write_hparams(self, config: Mapping[str, Any], results: Mapping[str, float]) -> None:
    """The run's hyperparameters (`hparams(config)`) against `results`, for the HPARAMS tab."""
    if self.tb is not None:
      self.tb.add_hparams(hparams(config), {f"hparams/{k}": float(v) for k, v in results.items()},
                          name="hparams")

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()

  def say(self, msg: str) -> None:
    if self.primary:
      print(msg, flush=True)


class LayerLog:
  """Per binarized layer, at each evaluation: the Laplace scale b of the latent
  weights, the quantization error of the layer's binarizer (BiPer Eq. 1 / 4;
  `analysis.layer_stats`), the share of binarized weights that flipped since
  the previous evaluation (BiPer Fig. 4), and the latent weights themselves
  for histograms."""

  def __init__(self, model, image_shape, params):
    self.layers = analysis.binarized_layers(model, image_shape)
    self.previous = self._kernels(params)

  def _kernels(self, params):
    return analysis.binarized_kernels(jax.device_get(params), self.layers)

  def record(self, params, step: int, epoch: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the metrics record, {'weights/<layer>': latent kernel}) at this evaluation."""
    kernels = self._kernels(params)
    stats = analysis.layer_stats(jax.device_get(params), self.layers)
    flips = analysis.sign_flip_share(self.previous, kernels, self.layers)
    for path, share in flips.layers.items():
      stats[path]["sign_flip_share"] = share
    self.previous = kernels
    record = {"kind": "layers", "step": step, "epoch": epoch,
              "sign_flip_share": flips.overall, "layers": stats}
    return record, {f"weights/{path}": k for path, k in kernels.items()}
