"""Tests of the analysis tools: BiPer's QE, FDA series, layer statistics, figures."""
import json
import math
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

import randn  # tests/randn.py
from fda_biper_jax import analysis, models, plots, quantizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------
# BiPer quantization error
# --------------------------------------------------------------------------


def test_qe_maximum_and_location():
  x_star, qe_star = analysis.qe_maximum()
  assert abs(qe_star - 0.102835) < 1e-6
  assert abs(x_star - 0.9549) < 1e-3
  assert abs(x_star - 0.954882) < 1e-5  # the paper's 0.954882
  grid = np.linspace(0.5, 2.0, 3001)
  assert analysis.biper_quantization_error(grid, 1.0).max() <= qe_star + 1e-12


def test_qe_limits_and_stability():
  qe = analysis.biper_quantization_error
  assert qe(0.0, 20.0) == 0.0
  assert qe(1e-4, 1.0) == pytest.approx(1e-8, rel=1e-6)  # QE ~ x^2 as x -> 0
  assert qe(1e6, 1.0) == pytest.approx(0.5 - 4 / math.pi ** 2, abs=1e-11)
  assert qe(math.inf, 1.0) == pytest.approx(analysis.SIGN_QE_LIMIT, abs=1e-15)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no overflow / divide warnings anywhere
    x = np.concatenate([[0.0], np.logspace(-300, 300, 2001), [np.inf]])
    v = qe(x, 1.0)
  assert v.shape == x.shape and np.all(np.isfinite(v))
  assert np.all(v >= 0) and np.all(v <= 0.102835)
  # Both branches of the closed form agree across x = 1.
  assert qe(1 - 1e-12, 1.0) == pytest.approx(qe(1 + 1e-12, 1.0), abs=1e-12)


def test_qe_broadcasts_b_against_omega0():
  b, w = np.array([0.01, 0.05]), np.array([[10.0], [20.0]])
  v = analysis.biper_quantization_error(b, w)
  assert v.shape == (2, 2)
  assert v[1, 1] == analysis.biper_quantization_error(0.05, 20.0)
  assert isinstance(analysis.biper_quantization_error(0.05, 20.0), float)


@pytest.mark.parametrize("x", [0.1, 0.9549, 3.0])
def test_laplace_sin_moments_match_quadrature(x):
  # w ~ Laplace(0, 1), frequency x: E g(sin(x w)) = int_0^inf e^-w g(sin(x w)) dw.
  sin2 = integrate.quad(lambda w: math.exp(-w) * math.sin(x * w) ** 2, 0, 60, limit=400)[0]
  abs_ = integrate.quad(lambda w: math.exp(-w) * abs(math.sin(x * w)), 0, 60, limit=400)[0]
  m2, m1 = analysis.laplace_sin_moments(x)
  assert m2 == pytest.approx(sin2, rel=1e-8)
  assert m1 == pytest.approx(abs_, rel=1e-7)


@pytest.mark.parametrize("b,omega0", [(0.01, 20.0), (0.05, 20.0), (0.1, 5.0), (0.02, 100.0),
                                      (0.004, 30.0)])
def test_closed_form_matches_monte_carlo(b, omega0):
  est = analysis.biper_quantization_error_mc(b, omega0, 200_000, seed=1)
  assert abs(est.value - analysis.biper_quantization_error(b, omega0)) < 4 * est.stderr


@pytest.mark.parametrize("law,pdf,lim", [
    ("gaussian", lambda w: stats.norm.pdf(w, scale=0.05), 0.5),
    ("uniform", lambda w: 1 / 0.1 if abs(w) <= 0.05 else 0.0, 0.05)])
def test_monte_carlo_other_laws_match_quadrature(law, pdf, lim):
  # b = 0.05, omega0 = 20: Var|sin(omega0 w)| by quadrature of the law's density.
  m2 = integrate.quad(lambda w: pdf(w) * math.sin(20 * w) ** 2, -lim, lim, limit=400)[0]
  m1 = integrate.quad(lambda w: pdf(w) * abs(math.sin(20 * w)), -lim, lim, limit=400,
                      points=[0.0])[0]
  est = analysis.biper_quantization_error_mc(0.05, 20.0, 200_000, seed=2, law=law)
  assert abs(est.value - (m2 - m1 ** 2)) < 4 * est.stderr


def test_bad_values_raise():
  with pytest.raises(ValueError, match="b=-0.1"):
    analysis.biper_quantization_error(-0.1, 20.0)
  with pytest.raises(ValueError, match="omega0=0.0"):
    analysis.biper_quantization_error(0.1, 0.0)
  with pytest.raises(ValueError, match="law='cauchy'"):
    analysis.biper_quantization_error_mc(0.1, 20.0, law="cauchy")
  with pytest.raises(ValueError, match="n=-1"):
    analysis.fda_series(jnp.zeros(3), -1)
  with pytest.raises(ValueError, match="empty"):
    analysis.laplace_scale(np.zeros(0))


# --------------------------------------------------------------------------
# FDA series
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n,omega", [(0, 1.0), (3, 1.0), (9, 0.1), (17, 2.5)])
def test_fda_series_derivative_is_grad_of_series(n, omega):
  x = jnp.linspace(-4.0, 4.0, 257)
  grad = jax.vmap(jax.grad(lambda t: analysis.fda_series(t, n, omega)))(x)
  ref = quantizers.fda_series_derivative(x, omega, n, n)
  scale = 4 * omega * (n + 1) / math.pi  # max |s_n'|
  np.testing.assert_allclose(grad, ref, atol=1e-5 * scale)
  # ... and it is the gradient the FDA quantizer uses (no clip).
  q = quantizers.get("fda", omega=omega, n_terms=n, clip=None)
  np.testing.assert_allclose(jax.grad(lambda t: jnp.sum(q(t)))(x), ref, atol=1e-5 * scale)


def test_fda_series_approaches_sign():
  x = jnp.array([-2.0, -0.5, 0.5, 2.0])
  assert np.all(np.abs(analysis.fda_series(x, 400) - jnp.sign(x)) < 0.01)
  assert float(analysis.fda_series(0.0, 5)) == 0.0


def test_fda_energy_share_monotone_to_one():
  shares = [analysis.fda_energy_share(n) for n in range(60)]
  assert shares[0] == pytest.approx(8 / math.pi ** 2)
  assert all(a < b < 1 for a, b in zip(shares, shares[1:]))
  assert analysis.fda_energy_share(100_000) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("n", [0, 3, 9])
def test_fda_approximation_error(n):
  # One period: 1 - energy share (Parseval), whatever omega.
  for omega in (1.0, 0.1, 7.0):
    assert analysis.fda_approximation_error(n, omega) == pytest.approx(
        1 - analysis.fda_energy_share(n), abs=1e-12)
  # A partial interval: against the midpoint rule on s_n itself (FDA's omega 0.1 on |x| <= 1).
  m = 200_000
  x = (np.arange(m) + 0.5) / m * 2 - 1
  s = np.asarray(analysis.fda_series(jnp.asarray(x), n, 0.1), np.float64)
  assert analysis.fda_approximation_error(n, 0.1, 1.0) == pytest.approx(
      np.mean((np.sign(x) - s) ** 2), rel=1e-4)


# --------------------------------------------------------------------------
# Per-tensor statistics
# --------------------------------------------------------------------------


def test_laplace_scale_recovers_b():
  w = analysis.sample_weights("laplace", 0.03, 200_000, seed=3)
  assert analysis.laplace_scale(w) == pytest.approx(0.03, rel=0.01)
  shifted = w + 0.2
  assert analysis.laplace_scale(shifted, estimate_location=True) == pytest.approx(0.03, rel=0.01)
  assert analysis.laplace_scale(shifted) > 0.2  # location fixed at 0 by default


def test_empirical_qe_of_laplace_samples():
  b, omega0, n = 0.04, 20.0, 200_000
  w = analysis.sample_weights("laplace", b, n, seed=4)
  est = analysis.biper_quantization_error_mc(b, omega0, n, seed=4)
  assert analysis.empirical_qe(w, omega0) == pytest.approx(est.value, rel=1e-12)
  assert abs(analysis.empirical_qe(w, omega0) - analysis.biper_quantization_error(b, omega0)) \
      < 4 * est.stderr
  # Sign's fundamental is w: QE = Var|w| = b^2, relative QE = 1/2 for Laplace weights.
  assert analysis.empirical_qe(w) == pytest.approx(b * b, rel=0.02)
  assert analysis.empirical_qe(w, relative=True) == pytest.approx(0.5, abs=0.01)
  assert analysis.empirical_qe(np.full(10, 0.3)) == pytest.approx(0.0, abs=1e-15)  # exact binary


def test_sign_flip_share_on_constructed_snapshots():
  rng = np.random.default_rng(5)
  old = {"a": rng.uniform(0.1, 1.0, (3, 3, 4, 8)) * rng.choice([-1, 1], (3, 3, 4, 8)),
         "b": rng.uniform(0.1, 1.0, (16, 10))}
  new = {k: v.copy() for k, v in old.items()}
  new["a"].reshape(-1)[:36] *= -1        # 36 of 288 flip sign
  new["b"] *= 2.0                        # no sign changes
  new["b"][0, :5] *= -1                  # 5 of 160 flip
  share = analysis.sign_flip_share(old, new, quantizers.get("ste"))
  assert share.layers == pytest.approx({"a": 36 / 288, "b": 5 / 160})
  assert share.overall == pytest.approx(41 / 448)
  assert analysis.sign_flip_share(old, old, "approx_sign").overall == 0.0
  # BiPer: half a period, pi / omega0, flips every binarized weight.
  q = quantizers.get("biper", omega0=20.0)
  w = {"a": np.linspace(-0.9, 0.9, 1000) + 1e-4}
  moved = {"a": w["a"] + math.pi / 20.0}
  share = analysis.sign_flip_share(w, moved, {"a": q})
  assert share.layers["a"] == pytest.approx(1.0, abs=0.005)
  with pytest.raises(ValueError, match="different layers"):
    analysis.sign_flip_share(old, {"a": new["a"]}, "ste")


def test_gradient_cosine():
  g = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": (jnp.array([1.0]), jnp.array(-4.0))}
  neg = jax.tree.map(lambda v: -v, g)
  assert analysis.gradient_cosine(g, g) == pytest.approx(1.0)
  assert analysis.gradient_cosine(g, neg) == pytest.approx(-1.0)
  assert analysis.gradient_cosine(g, jax.tree.map(lambda v: 3 * v, g)) == pytest.approx(1.0)
  assert analysis.gradient_cosine({"x": jnp.array([1.0, 0.0])},
                                  {"x": jnp.array([0.0, 2.0])}) == pytest.approx(0.0)
  assert math.isnan(analysis.gradient_cosine(g, jax.tree.map(jnp.zeros_like, g)))
  with pytest.raises(ValueError, match="pytrees differ"):
    analysis.gradient_cosine(g, {"w": g["w"]})


# --------------------------------------------------------------------------
# A model's binarized layers
# --------------------------------------------------------------------------

SHAPE = (8, 8, 3)


def _tiny(kernel_quantizer="biper"):
  return models.create("tiny_cnn", 4, kernel_quantizer=kernel_quantizer,
                       input_quantizer="approx_sign", scaling="learned")


@pytest.fixture(scope="module")
def tiny():
  model = _tiny()
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *SHAPE)), train=False))(
      jax.random.key(0))
  return model, variables


def test_binarized_layers_are_exactly_the_binary_convs():
  found = analysis.binarized_layers(_tiny(), SHAPE)
  assert list(found) == ["unit1/conv", "unit2/conv"]  # stem conv and head fc are float
  assert all(q == quantizers.get("biper", omega0=20.0) for q in found.values())
  assert analysis.binarized_layers(_tiny("identity"), SHAPE) == {}  # full-precision twin
  stage1 = analysis.binarized_layers(_tiny("biper_sine"), SHAPE)
  assert stage1 == found  # stage 1's kernels, as stage 2 binarizes them
  assert list(analysis.binarized_layers(_tiny("ste"), SHAPE).values()) == [
      quantizers.get("ste")] * 2


def test_model_layer_stats(tiny):
  model, variables = tiny
  params = variables["params"]
  got = analysis.model_layer_stats(model, params, SHAPE)
  assert set(got) == {"unit1/conv", "unit2/conv"}
  for path, n in (("unit1/conv", 3 * 3 * 16 * 32), ("unit2/conv", 3 * 3 * 32 * 64)):
    s, w = got[path], np.asarray(params[path.split("/")[0]]["conv"]["kernel"])
    assert s["num_weights"] == n
    assert s["laplace_b"] == pytest.approx(np.mean(np.abs(w)), rel=1e-6)
    assert s["qe"] == pytest.approx(np.var(np.abs(np.sin(20.0 * w.astype(np.float64)))))
    assert s["qe_laplace"] == pytest.approx(analysis.biper_quantization_error(s["laplace_b"], 20))
    assert 0 < s["qe_relative"] < 1
    assert s["sign_share"] == pytest.approx(np.mean(np.sin(20.0 * w) >= 0), abs=1e-6)
  json.dumps(got)  # loggable as is
  # Sign binarizers: the fundamental is w itself, and QE_laplace = b^2.
  ste = analysis.model_layer_stats(_tiny("ste"), params, SHAPE)["unit1/conv"]
  assert ste["qe_laplace"] == pytest.approx(ste["laplace_b"] ** 2)


def test_gradient_mismatch(tiny):
  model, variables = tiny
  x = randn.normal(jax.random.key(1), (4, *SHAPE))
  batch = (x, jnp.arange(4))
  same = analysis.gradient_mismatch(model, variables, batch, reference=model.spec.kernel_quantizer)
  assert same.overall == pytest.approx(1.0)
  assert same.layers == pytest.approx({"unit1/conv": 1.0, "unit2/conv": 1.0})
  twin = analysis.gradient_mismatch(model, variables, batch)  # vs the full-precision twin
  assert set(twin.layers) == {"unit1/conv", "unit2/conv"}
  assert all(-1 <= c <= 1 for c in [twin.overall, *twin.layers.values()])
  assert twin.overall < 0.99  # binarizing the kernels changes the gradient


# --------------------------------------------------------------------------
# Figures and the command line
# --------------------------------------------------------------------------


def _check_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  assert os.path.getsize(path) > 10_000


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.analysis", *map(str, args)],
                        cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_qe_command(tmp_path):
  out = tmp_path / "figs" / "qe"  # created
  proc = _cli("qe", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  _check_png(out / "qe.png")
  assert proc.stdout.split() == [str(out / "qe.png")]
  assert len(plots.plot_qe().axes) == 2


def test_quantizers_figures(tmp_path):
  written = plots.write_figures("quantizers", str(tmp_path))
  figs = {os.path.basename(p): f for p, f in written.items()}
  assert set(figs) == {"quantizers.png", "fda_series.png"}
  for path in written:
    _check_png(path)
  assert len(figs["quantizers.png"].axes) == 2 * len(quantizers.NAMES)  # forward | backward
  assert len(figs["fda_series.png"].axes) == 3
  series = figs["fda_series.png"].axes[0]
  assert [l.get_label() for l in series.get_lines()] == ["sign", "s_1", "s_3", "s_9", "s_17"]


def _write_run(workdir, with_layers: bool, scale: float = 1.0, config=None):
  """metrics.jsonl as the trainer writes it (RunLog: 'train' and 'eval' lines, LayerLog:
  'layers' lines), and the run's config.json if `config`."""
  os.makedirs(workdir, exist_ok=True)
  paths = ["unit1/conv", "unit2/conv"]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for e in range(1, 5):
      f.write(json.dumps({"kind": "train", "step": 10 * e, "epoch": e, "loss": scale * 2 / e,
                          "accuracy": 1 - 1 / (e + 1), "learning_rate": 0.1,
                          "grad_norms": {p: 0.5 for p in paths}}) + "\n")
      f.write(json.dumps({"kind": "eval", "step": 10 * e, "epoch": e, "loss": scale * 2.2 / e,
                          "accuracy": 0.9 - 1 / (e + 1)}) + "\n")
      if with_layers:
        layers = {p: {"laplace_b": scale * 0.05 / e, "qe": 0.09 + 0.001 * i,
                      **({"sign_flip_share": 0.1 / e} if e > 1 else {})}
                  for i, p in enumerate(paths)}
        f.write(json.dumps({"kind": "layers", "step": 10 * e, "epoch": e,
                            "sign_flip_share": 0.1 / e, "layers": layers}) + "\n")
  if config is not None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config, f)


def test_run_figure_with_layer_stats(tmp_path):
  _write_run(tmp_path / "run", with_layers=True)
  (path, fig), = plots.write_figures("run", str(tmp_path / "out"), [str(tmp_path / "run")]).items()
  _check_png(path)
  axes = {ax.get_title(): ax for ax in fig.axes}
  assert set(axes) == {"loss", "accuracy", "Laplace scale b", "quantization error QE",
                       "share of flipped signs"}
  assert len(axes["loss"].get_lines()) == 2  # train and eval
  assert len(axes["Laplace scale b"].get_lines()) == 2  # one per layer
  flips = axes["share of flipped signs"].get_lines()[0]
  assert list(flips.get_xdata()) == [2, 3, 4]  # epoch 1 has no flip share


def test_run_figure_without_layer_stats(tmp_path):
  _write_run(tmp_path / "run", with_layers=False)
  fig = plots.plot_runs(plots.load_runs([str(tmp_path / "run")]))
  assert len(fig.axes) == 5
  qe_panel = next(ax for ax in fig.axes if ax.get_title() == "quantization error QE")
  assert "no per-layer statistics" in qe_panel.texts[0].get_text()


def _legend(ax) -> list[str]:
  return [t.get_text() for t in ax.get_legend().get_texts()]


def test_runs_overlaid_one_colour_each_labelled_by_their_quantizers(tmp_path):
  biper = {"model": "resnet20", "quantization": {
      "kernel_quantizer": {"name": "biper", "omega0": 20.0},
      "input_quantizer": {"name": "approx_sign"}, "scaling": "learned", "prenorm": True}}
  _write_run(tmp_path / "biper_run", with_layers=True, config=biper)
  _write_run(tmp_path / "fda_run", with_layers=True, scale=1.5, config={
      "quantization": {"kernel_quantizer": {"name": "fda"}, "input_quantizer": "fda"}})
  _write_run(tmp_path / "plain", with_layers=True, scale=2.0)  # no config.json
  workdirs = [str(tmp_path / d) for d in ("biper_run", "fda_run", "plain")]
  (path, fig), = plots.write_figures("run", str(tmp_path / "out"), workdirs).items()
  _check_png(path)
  axes = {ax.get_title(): ax for ax in fig.axes}
  labels = ["biper/approx_sign", "fda", "plain"]
  for name in ("loss", "accuracy"):
    assert _legend(axes[name]) == [f"{l} {kind}" for l in labels for kind in ("train", "eval")]
  for name in ("Laplace scale b", "quantization error QE", "share of flipped signs"):
    assert _legend(axes[name]) == labels
    lines = axes[name].get_lines()
    assert len(lines) == 3 * 2  # every run's two layers
    colours = [{l.get_color() for l in lines[2 * i:2 * i + 2]} for i in range(3)]
    assert all(len(c) == 1 for c in colours) and len(set.union(*colours)) == 3
  # the second run's curves are its own numbers, in its colour
  fda_loss = [l for l in axes["loss"].get_lines() if l.get_label() == "fda train"][0]
  np.testing.assert_allclose(fda_loss.get_ydata(), [1.5 * 2 / e for e in range(1, 5)])


def test_runs_with_the_same_quantizers_are_told_apart_by_their_workdirs(tmp_path):
  config = {"quantization": {"kernel_quantizer": "ste", "input_quantizer": "ste"}}
  for name in ("a", "b"):
    _write_run(tmp_path / name, with_layers=False, config=config)
  runs = plots.load_runs([str(tmp_path / "a"), str(tmp_path / "b")])
  assert list(runs) == [f"ste ({tmp_path / 'a'})", f"ste ({tmp_path / 'b'})"]


def test_run_command_overlays_workdirs_given_by_commas_or_repeated(tmp_path):
  for name in ("a", "b", "c"):
    _write_run(tmp_path / name, with_layers=True)
  proc = _cli("run", f"--workdirs={tmp_path / 'a'},{tmp_path / 'b'}",
              f"--workdir={tmp_path / 'c'}", f"--out={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == [str(tmp_path / "out" / "run.png")]
  _check_png(tmp_path / "out" / "run.png")


def test_run_without_logs_is_one_clear_error(tmp_path):
  def error(*workdirs):
    with pytest.raises(ValueError) as e:
      plots.write_figures("run", str(tmp_path / "o"), [str(w) for w in workdirs])
    assert "\n" not in str(e.value)
    return str(e.value)

  _write_run(tmp_path / "good", with_layers=False)
  assert "metrics.jsonl does not exist" in error(tmp_path / "good", tmp_path / "empty")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "epoch": 1}) + "\n")
  assert "no 'train' lines" in error(tmp_path / "empty")
  (tmp_path / "empty" / "metrics.jsonl").write_text("{not json\n")
  assert "line 1 is not JSON" in error(tmp_path / "empty")
  assert "'run' needs the workdirs" in error()
  assert not (tmp_path / "o").exists()  # nothing written


def test_run_without_logs_subprocess(tmp_path):
  proc = _cli("run", f"--workdirs={tmp_path / 'none'}", f"--out={tmp_path / 'o'}")
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f"python -m experiments.analysis: error: {tmp_path / 'none' / 'metrics.jsonl'} "
      "does not exist; allowed: a training run's workdir"]
  assert not (tmp_path / "o").exists()
