"""The NNX layers on the Linen layers' core: same weights, same outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import randn  # tests/randn.py
from fda_biper_jax import layers, models, training_step
from fda_biper_jax.nn import nnx as bnnx

QUANTIZATIONS = {
    "biper": dict(kernel_quantizer={"name": "biper", "tau": 0.05}, input_quantizer="approx_sign",
                  scaling="learned", prenorm=True),
    "fda_noise": dict(kernel_quantizer={"name": "fda", "noise": True},
                      input_quantizer={"name": "fda", "noise": True}, scaling="mean_abs"),
    "rsign": dict(kernel_quantizer={"name": "ste", "clip": 1.0}, input_quantizer="rsign",
                  scaling="mean_abs_tensor"),
}


def _pair(kind, quantization, seed=0):
  """(linen layer, its variables, the NNX layer holding the same parameters, input)."""
  x = randn.normal(jax.random.key(seed), (2, 7, 7, 4) if kind == "conv" else (3, 4))
  if kind == "conv":
    lin = layers.BinaryConv(6, (3, 3), strides=2, **quantization)
    nx = bnnx.BinaryConv(4, 6, (3, 3), 2, rngs=nnx.Rngs(seed), **quantization)
  else:
    lin = layers.BinaryDense(6, **quantization)
    nx = bnnx.BinaryLinear(4, 6, rngs=nnx.Rngs(seed), **quantization)
  v = lin.init(jax.random.key(seed + 1), x, train=False)
  # Non-trivial thresholds, so that the learned parts matter.
  if "input_threshold" in v["params"]:
    v["params"]["input_threshold"]["alpha"] = jnp.linspace(-0.3, 0.3, 4)
  state = nnx.state(nx, nnx.Param)
  state.replace_by_pure_dict(v["params"])
  nnx.update(nx, state)
  return lin, v, nx, x


@pytest.mark.parametrize("kind", ["conv", "dense"])
@pytest.mark.parametrize("name", sorted(QUANTIZATIONS))
def test_linen_and_nnx_layers_give_the_same_outputs_and_gradients(kind, name):
  lin, v, nx, x = _pair(kind, QUANTIZATIONS[name])
  assert set(nnx.state(nx, nnx.Param).to_pure_dict()) == set(v["params"])
  cot = randn.normal(jax.random.key(7), lin.apply(v, x, train=False).shape)

  def linen_loss(params, x, train):
    y, st = lin.apply({"params": params}, x, train=train, mutable=["losses"])
    return jnp.sum(y * cot) + sum(jax.tree.leaves(st.get("losses", {})))

  def nnx_loss(model, x):
    return jnp.sum(model(x) * cot) + bnnx.pop_regularizers(model)

  with training_step(3, 10):  # FDA's schedules
    for train in (True, False):
      nx.deterministic = not train
      np.testing.assert_allclose(nx(x), lin.apply(v, x, train=train), rtol=1e-6, atol=1e-6)
      bnnx.pop_regularizers(nx)
      g_lin, gx_lin = jax.grad(linen_loss, argnums=(0, 1))(v["params"], x, train)
      g_nnx = nnx.grad(nnx_loss, argnums=(0, 1))(nx, x)
      np.testing.assert_allclose(g_nnx[1], gx_lin, rtol=1e-5, atol=1e-6)
      for path, g in jax.tree_util.tree_leaves_with_path(g_lin):
        got = g_nnx[0]
        for k in path:
          got = got[k.key]
        np.testing.assert_allclose(got[...] if hasattr(got, "get_value") else got, g,
                                   rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_the_mode_must_be_set_and_follows_train_and_eval():
  nx = bnnx.BinaryConv(4, 6, (3, 3), rngs=nnx.Rngs(0), kernel_quantizer="ste",
                       input_quantizer="ste")
  x = jnp.ones((1, 5, 5, 4))
  with pytest.raises(ValueError, match="the mode is not set: deterministic=False"):
    nx(x)
  model = nnx.Sequential(nx, nnx.BatchNorm(6, rngs=nnx.Rngs(1)))
  model.train()
  assert nx.deterministic is False
  g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
  assert float(jnp.abs(g.layers[0].kernel[...]).max()) > 0  # surrogate gradients
  model.eval()
  assert nx.deterministic is True
  assert set(np.unique(np.asarray(bnnx.BinaryConv(
      4, 6, (3, 3), rngs=nnx.Rngs(0), kernel_quantizer="ste", deterministic=True)
      .kernel[...] >= 0))) <= {True, False}
  float_layer = bnnx.BinaryLinear(4, 3, rngs=nnx.Rngs(0))  # no quantizer: no mode needed
  assert float_layer(jnp.ones((2, 4))).shape == (2, 3)


def test_nnx_layers_take_every_argument_of_nnx_conv_and_linear():
  import inspect  # noqa: PLC0415
  for binary, base in ((bnnx.BinaryConv, nnx.Conv), (bnnx.BinaryLinear, nnx.Linear)):
    ours = inspect.signature(binary.__init__).parameters
    for name, p in inspect.signature(base.__init__).parameters.items():
      assert name in ours or any(q.kind is q.VAR_KEYWORD for q in ours.values()), name
    layer = binary(*(4, 6, (3, 3))[:3 if binary is bnnx.BinaryConv else 2], rngs=nnx.Rngs(0),
                   use_bias=False, param_dtype=jnp.float32, precision="highest",
                   kernel_quantizer="ste", deterministic=True)
    assert not layer.use_bias


def test_zoo_resnet20_trains_in_nnx_with_nnx_optimizer():
  """The README's NNX example: a zoo model through flax's Linen -> NNX bridge."""
  linen_model = models.create("resnet20", 4, kernel_quantizer="biper",
                              input_quantizer="approx_sign", scaling="learned", prenorm=True)
  model = nnx.bridge.ToNNX(linen_model, rngs=nnx.Rngs(0))
  x = randn.normal(jax.random.key(0), (8, 16, 16, 3))
  y = jnp.arange(8) % 4
  nnx.bridge.lazy_init(model, x, train=False)
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, x, y)) for _ in range(8)]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
