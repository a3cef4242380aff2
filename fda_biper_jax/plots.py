"""The analyses' figures (`fda_biper_jax.analysis`), as matplotlib Figures and PNGs.

Needs matplotlib (`pip install "fda_biper_jax[analysis]"`). `write_figures(command, out,
workdirs)` draws and writes them; `fda-biper-jax-analysis` (`fda_biper_jax.cli.analysis`)
is its command line.

* qe: BiPer's quantization error QE(b omega0) of Laplace(0, b) weights
  (analysis Eq. 4), against x = b omega0 with its maximum, the x -> inf limit
  and Monte-Carlo points, and against omega0 for several b (BiPer Fig. 3).
* quantizers: every registered quantizer's training forward (with its
  deployed binarization dashed) and its backward, d/dx of the forward by
  `jax.grad` (the custom surrogate); and FDA's s_n for n = 1, 3, 9, 17
  against sign, their derivatives, and the error of s_n against n.
* run: training runs overlaid, one colour per run, labelled by its quantizers
  (`run_label`): from each WORKDIR/metrics.jsonl, loss and accuracy (train,
  eval), and from its 'layers' lines ({"kind": "layers", "step", "epoch",
  "layers": {path: {...}}}) each binarized layer's Laplace scale b, QE and share
  of flipped signs against epoch (BiPer Fig. 4b/c), layers nearer the input lighter.

Each `plot_*` function returns the Figure it drew; no pyplot, no backend is chosen.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from fda_biper_jax import analysis, methods
from fda_biper_jax.methods import schedule
from fda_biper_jax.methods.fda import fda_series_derivative
from fda_biper_jax.train import runlog

COMMANDS = ("qe", "quantizers", "run")
QE_SCALES = (0.005, 0.01, 0.02, 0.05)   # Laplace b of the QE-vs-omega0 curves
PUBLIC_OMEGA0 = 20.0                    # omega0 of every BiPer run script
FDA_ORDERS = (1, 3, 9, 17)
LAYER_KEYS = (("laplace_b", "Laplace scale b"), ("qe", "quantization error QE"),
              ("sign_flip_share", "share of flipped signs"))
LAYER_ALPHAS = (0.3, 1.0)               # a run's layers, from the input to the output


def plot_qe() -> Figure:
  """QE against x = b omega0 (maximum, limit, Monte Carlo) and against omega0 per b."""
  fig = Figure(figsize=(12, 4.5), layout="constrained")
  ax_x, ax_w = fig.subplots(1, 2)
  x_star, qe_star = analysis.qe_maximum()

  x = np.logspace(-2, 2, 600)
  ax_x.semilogx(x, analysis.biper_quantization_error(x, 1.0), lw=2, label="closed form (Laplace)")
  x_mc = np.logspace(-1.5, 1.5, 13)
  mc = [analysis.biper_quantization_error_mc(v, 1.0, 20_000, seed=i) for i, v in enumerate(x_mc)]
  ax_x.errorbar(x_mc, [e.value for e in mc], yerr=[2 * e.stderr for e in mc], fmt="o", ms=4,
                color="k", label="Monte Carlo (2 s.e.)")
  ax_x.axhline(analysis.SIGN_QE_LIMIT, ls="--", color="gray",
               label=f"x -> inf: 1/2 - 4/pi^2 = {analysis.SIGN_QE_LIMIT:.4f}")
  ax_x.plot([x_star], [qe_star], "r*", ms=14, label=f"max {qe_star:.6f} at x = {x_star:.6f}")
  ax_x.set(title="BiPer quantization error, w ~ Laplace(0, b)", xlabel="x = b * omega0",
           ylabel="QE = Var|sin(omega0 w)|", ylim=(0, 0.12))
  ax_x.legend(loc="lower right", fontsize=8)

  omega0 = np.logspace(0, 3.5, 600)
  for b in QE_SCALES:
    line, = ax_w.semilogx(omega0, analysis.biper_quantization_error(b, omega0), label=f"b = {b}")
    ax_w.plot([x_star / b], [qe_star], "*", color=line.get_color(), ms=10)
  ax_w.axvline(PUBLIC_OMEGA0, ls=":", color="gray",
               label=f"omega0 = {PUBLIC_OMEGA0:g} (public code)")
  ax_w.set(title="QE against omega0 (stars: maxima at omega0 = x*/b)", xlabel="omega0",
           ylabel="QE", ylim=(0, 0.12))
  ax_w.legend(loc="upper left", fontsize=8)
  return fig


def _params_text(q: methods.Quantizer) -> str:
  def text(v):
    if isinstance(v, schedule.Schedule):
      return f"{v.shape} {v.start:g}->{v.end:g} at mid-training"
    return f"{v:g}" if isinstance(v, float) else str(v)
  return ", ".join(f"{k}={text(v)}" for k, v in q.kwargs.items()
                   if v is not None and not isinstance(v, Mapping))


def plot_quantizers(x_max: float = 1.5) -> Figure:
  """One row per registered method: forward | backward (jax.grad), schedules at
  mid-training."""
  names = methods.names()
  fig = Figure(figsize=(11, 2.2 * len(names)), layout="constrained")
  axes = fig.subplots(len(names), 2, squeeze=False)
  x = jnp.linspace(-x_max, x_max, 2001)
  for (ax_f, ax_b), name in zip(axes, names):
    q = methods.get(name)
    with schedule.training_step(50, 101, 10):  # halfway: epoch 5 of 10
      forward = q(x)
      backward = jax.grad(lambda t, q=q: jnp.sum(q(t)))(x)  # elementwise: d q(x_i) / d x_i
    params = _params_text(q)
    label = f"{name} ({params})" if params else name
    ax_f.plot(x, forward, lw=2, label="training forward q(x)")
    ax_f.plot(x, q.binarize(x), "--", color="k", lw=1, label="deployed q.binarize(x)")
    ax_f.set(title=f"{label}: forward", ylabel="F(x)")
    ax_b.plot(x, backward, color="C3", lw=2, label="backward: jax.grad of q")
    ax_b.axhline(0.0, color="gray", lw=0.5)
    ax_b.set(title=f"{label}: backward", ylabel="dF/dx used")
  for ax in axes[-1]:
    ax.set_xlabel("x")
  handles = [h for ax in axes[0] for h in ax.get_lines()[:2] if not h.get_label().startswith("_")]
  fig.legend(handles=handles, loc="outside upper center", ncols=len(handles))
  return fig


def plot_fda_series(orders: Sequence[int] = FDA_ORDERS) -> Figure:
  """s_n against sign over one period (omega = 1), s_n', and the error against n."""
  fig = Figure(figsize=(15, 4.5), layout="constrained")
  ax_s, ax_d, ax_e = fig.subplots(1, 3)
  x = jnp.linspace(-math.pi, math.pi, 4001)
  ax_s.plot(x, methods.sign(x), color="k", lw=1.5, label="sign")
  for n in orders:
    ax_s.plot(x, analysis.fda_series(x, n), label=f"s_{n}")
    ax_d.plot(x, fda_series_derivative(x, 1.0, n, n), label=f"s_{n}'")
  ax_s.set(title="FDA: truncated Fourier series of sign (omega = 1)", xlabel="x", ylabel="s_n(x)")
  ax_d.set(title="its derivative, the FDA backward", xlabel="x", ylabel="s_n'(x)")
  n_all = np.arange(0, 41)
  ax_e.semilogy(n_all, [analysis.fda_approximation_error(int(n)) for n in n_all],
                label="MSE vs sign over one period = 1 - energy share")
  ax_e.semilogy(n_all, [analysis.fda_approximation_error(int(n), 0.1, 1.0) for n in n_all],
                label="MSE vs sign on |x| <= 1, omega = 0.1 (BiBench)")
  ax_e.set(title="approximation error of s_n", xlabel="n", ylabel="mean squared error")
  for ax in (ax_s, ax_d, ax_e):
    ax.legend(fontsize=8)
  return fig


# --------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------


def load_run(workdir: str) -> list[dict[str, Any]]:
  """The records of WORKDIR/metrics.jsonl; ValueError (one line) if there are none to plot."""
  records = runlog.read(workdir)
  path = os.path.join(workdir, runlog.METRICS_FILE)
  if not any(r.get("kind") == "train" for r in records):
    raise ValueError(f"{path} has no 'train' lines; nothing to plot")
  return records


def quantizer_name(spec: Any) -> str | None:
  """'biper' for {'name': 'biper', ...} or 'biper'."""
  return spec.get("name") if isinstance(spec, Mapping) else spec


def run_label(workdir: str) -> str:
  """The run's quantizers, from WORKDIR/config.json (the run's resolved config):
  'biper_sine/approx_sign' (kernel/input), one name when both are the same; the
  workdir's name when there is no config.json or it holds no quantization."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      quantization = json.load(f).get("quantization") or {}
    names = [quantizer_name(quantization.get(k)) for k in ("kernel_quantizer", "input_quantizer")]
  except (OSError, ValueError, AttributeError):
    names = []
  return "/".join(dict.fromkeys(str(n) for n in names if n)) or \
      os.path.basename(os.path.normpath(workdir))


def load_runs(workdirs: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
  """{label: records} of each workdir, in order (`run_label`, followed by the workdir
  where two runs have the same label); ValueError (one line) for a run without logs."""
  labels = [run_label(w) for w in workdirs]
  return {label if labels.count(label) == 1 else f"{label} ({w})": load_run(w)
          for w, label in zip(workdirs, labels)}


def _series(records, kind: str, key: str):
  pts = [(r["epoch"], r[key]) for r in records
         if r.get("kind") == kind and key in r and "epoch" in r]
  return [p[0] for p in pts], [p[1] for p in pts]


def _layer_lines(ax, layer_records, key: str, colour: str, label: str) -> None:
  """A run's layers in its colour, lighter nearer the input; the legend shows the last."""
  paths = list(dict.fromkeys(p for r in layer_records for p in r.get("layers", {})))
  alphas = np.linspace(*LAYER_ALPHAS, len(paths)) if len(paths) > 1 else [1.0]
  drawn = []
  for path, alpha in zip(paths, alphas):
    pts = [(r["epoch"], r["layers"][path][key]) for r in layer_records
           if key in r.get("layers", {}).get(path, {})]
    if pts:
      drawn += ax.plot(*zip(*pts), marker=".", color=colour, alpha=alpha,
                       label=f"_{label}: {path}")
  if drawn:
    drawn[-1].set_label(label)


def plot_runs(runs: Mapping[str, Sequence[dict[str, Any]]], title: str = "") -> Figure:
  """Loss, accuracy, and per-layer Laplace b, QE and sign-flip share against epoch of
  every run ({label: records}), one colour each."""
  fig = Figure(figsize=(16, 9), layout="constrained")
  axd = fig.subplot_mosaic([["loss"] * 3 + ["accuracy"] * 3,
                            ["laplace_b"] * 2 + ["qe"] * 2 + ["sign_flip_share"] * 2])
  for i, (label, records) in enumerate(runs.items()):
    colour = f"C{i % 10}"
    for name in ("loss", "accuracy"):
      for kind, style in (("train", "-"), ("eval", "o--")):
        ep, val = _series(records, kind, name)
        if ep:
          axd[name].plot(ep, val, style, color=colour, label=f"{label} {kind}")
    layer_records = [r for r in records if r.get("kind") == "layers" and "epoch" in r]
    for key, _ in LAYER_KEYS:
      _layer_lines(axd[key], layer_records, key, colour, label)
  for name in ("loss", "accuracy"):
    axd[name].set(title=name, xlabel="epoch", ylabel=name)
    axd[name].legend(fontsize=8)
  for key, name in LAYER_KEYS:
    ax = axd[key]
    ax.set(title=name, xlabel="epoch (a run's layers: lighter nearer the input)", ylabel=name)
    if ax.get_lines():
      ax.legend(fontsize=8)
    else:
      ax.text(0.5, 0.5, "no per-layer statistics\n(no 'layers' lines in metrics.jsonl)",
              ha="center", va="center", transform=ax.transAxes, color="gray")
  if title:
    fig.suptitle(title)
  return fig


def write_figures(command: str, out: str, workdirs: str | Sequence[str] = ()) -> dict[str, Figure]:
  """Draws the figures of `command` ('qe', 'quantizers' or 'run': the runs in
  `workdirs` overlaid) into the folder `out` (created); returns {path written: Figure}.

  Raises:
    ValueError: unknown command, or (for 'run') no workdir or one without a usable
      metrics.jsonl (checked before anything is written).
  """
  workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
  if command == "qe":
    figures = {"qe.png": plot_qe}
  elif command == "quantizers":
    figures = {"quantizers.png": plot_quantizers, "fda_series.png": plot_fda_series}
  elif command == "run":
    if not workdirs:
      raise ValueError("'run' needs the workdirs of training runs")
    runs = load_runs(workdirs)
    title = ", ".join(os.path.abspath(w) for w in workdirs)
    figures = {"run.png": lambda: plot_runs(runs, title=title)}
  else:
    raise ValueError(f"command={command!r} is not allowed; allowed: {list(COMMANDS)}")
  os.makedirs(out, exist_ok=True)
  written = {}
  for name, draw in figures.items():
    fig = draw()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=100)
    written[path] = fig
  return written
