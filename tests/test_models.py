"""Tests of the model zoo (`fda_biper_jax.models`).

Cheap by design: parameter counts and the ImageNet ResNet-34 use
`jax.eval_shape` only; real forwards use batch 2 at 32x32 (ResNet-18 ImageNet
at 64x64) with variables filled from the init's shapes, so no test pays for
compiling a full random init except `test_init_values`.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import randn  # tests/randn.py
from fda_biper_jax import models
from fda_biper_jax.methods import schedule

BIPER = dict(kernel_quantizer={"name": "biper", "tau": 0.0468}, input_quantizer="approx_sign",
             scaling="learned", prenorm=True)
FDA_Q = {"name": "fda", "noise": True}  # n 9 -> 18 and alpha 0.1 -> 0: the method's defaults
FDA = dict(kernel_quantizer=FDA_Q, input_quantizer=FDA_Q, scaling="mean_abs")
STEP = (jnp.int32(3), 10, 5)  # a traced step of 10, 5 per epoch: n = 10, alpha in (0, 0.1)

ZOO = ("resnet18_cifar", "resnet20", "resnet20_fda", "vgg_small", "resnet18", "resnet34")
IMAGENET = ("resnet18", "resnet34")
NUM_CLASSES = 10

# Exact parameter counts (leaves of `params`: BN scale and bias included,
# batch_stats not), for the full-precision twin and for the BiPer setting
# (which adds one learned scale per output channel of each binary conv).
PARAMS = {
    #  name            twin        BiPer       published
    "resnet18_cifar": (11_001_162, 11_005_002, 11.01),
    "resnet20": (269_850, 270_522, 0.27),
    "resnet20_fda": (270_394, 271_066, None),
    "vgg_small": (4_660_106, 4_661_770, 4.66),
    "resnet18": (11_690_536, 11_694_376, 11.69),
    "resnet34": (21_798_696, 21_806_248, 21.81),
}
# The published CIFAR-18 and ResNet-34 counts include BiPer's learned scales
# (BiPer's README gives 11,694,376 for ResNet-18, = our BiPer count); without
# them these two round to 0.01M less.
TWIN_ROUNDED = {"resnet18_cifar": 11.00, "resnet34": 21.80}
# Binary convs per model (every other conv or fc is full precision).
BINARY_LAYERS = {"resnet18_cifar": 16, "resnet20": 18, "resnet20_fda": 18, "vgg_small": 5,
                 "resnet18": 16, "resnet34": 32}


def _size(name):
  return 64 if name in IMAGENET else 32


def _input(name, batch=2, seed=1):
  return randn.normal(jax.random.key(seed), (batch, _size(name), _size(name), 3))


def _shapes(model, x):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def _fill(model, x, seed=0):
  """params and batch_stats with the init's shapes, random values, no init compile."""
  shapes = _shapes(model, x)
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    key = path[-1].key
    if key in ("scale", "var"):
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
    return jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype)

  return {c: jax.tree_util.tree_map_with_path(leaf, shapes[c]) for c in ("params", "batch_stats")}


def _count(model, hw):
  shapes = _shapes(model, jnp.zeros((1, hw, hw, 3)))
  return sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))


@functools.lru_cache(maxsize=None)
def _run(name, quantization="biper"):
  """A model, its variables, and its eval forward with intermediates (cached)."""
  model = models.create(name, NUM_CLASSES, **{"biper": BIPER, "fda": FDA}[quantization])
  x = _input(name)
  variables = _fill(model, x)
  # jitted: op-by-op dispatch of a whole model's eval takes 7.6 s for resnet18_cifar, its
  # compile 1.1 s
  apply = jax.jit(functools.partial(model.apply, train=False, mutable=["intermediates"]))
  return model, variables, apply(variables, x)


def _train(model, variables, x, mutable=("batch_stats", "losses")):
  """One jitted training forward (a whole-model compile beats op-by-op dispatch), at
  `STEP` (so scheduled parameters have their step)."""
  def f(variables, x, step):
    with schedule.training_step(step, *STEP[1:]):
      return model.apply(variables, x, train=True, mutable=list(mutable))
  return jax.jit(f)(variables, x, STEP[0])


def _layers(tree, path=()):
  """(path, dict) of every layer that sowed a kernel."""
  if isinstance(tree, dict) or hasattr(tree, "items"):
    if "kernel" in tree:
      yield path, tree
    for k, v in tree.items():
      if k not in ("kernel", "input"):
        yield from _layers(v, path + (k,))


def _at(tree, path):
  for k in path:
    tree = tree[k]
  return tree


# ----------------------------------------------------------------- structure


def test_names():
  assert models.NAMES[:6] == ZOO
  assert set(models.NAMES) == set(ZOO) | {"vit_tiny", "tiny_cnn"}  # + the trainer's test model


@pytest.mark.parametrize("name", ZOO)
def test_parameter_counts(name):
  hw = 224 if name in IMAGENET else 32
  n_cls = 1000 if name in IMAGENET else 10
  twin, biper, published = PARAMS[name]
  assert _count(models.create(name, n_cls), hw) == twin
  assert _count(models.create(name, n_cls, **BIPER), hw) == biper
  if published is not None:
    assert round(biper / 1e6, 2) == published
    assert round(twin / 1e6, 2) == TWIN_ROUNDED.get(name, published)


@pytest.mark.parametrize("name", [n for n in ZOO if n not in IMAGENET])
def test_forward_cifar(name):
  model, variables, (eval_logits, _) = _run(name)
  logits, updates = _train(model, variables, _input(name))
  for y in (logits, eval_logits):
    assert y.shape == (2, NUM_CLASSES) and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
  assert set(updates) == {"batch_stats", "losses"}
  # BiPer's weight regulariser is sown once per binary layer.
  assert len(jax.tree.leaves(updates["losses"])) == BINARY_LAYERS[name]


def test_forward_resnet18_imagenet_small_input():
  model, variables, (eval_logits, _) = _run("resnet18")
  logits, _ = _train(model, variables, _input("resnet18"))
  for y in (logits, eval_logits):
    assert y.shape == (2, NUM_CLASSES) and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize("train", [True, False])
def test_resnet34_shapes(train):
  model = models.create("resnet34", 1000, **BIPER)
  x = jnp.zeros((2, 224, 224, 3))
  variables = _shapes(model, x)
  variables = {c: variables[c] for c in ("params", "batch_stats")}
  out, _ = jax.eval_shape(functools.partial(model.apply, train=train, mutable=["batch_stats"]),
                          variables, x)
  assert out.shape == (2, 1000) and out.dtype == jnp.float32


@pytest.mark.parametrize("name", [n for n in ZOO if n != "resnet34"])
def test_eval_is_binary_and_ends_are_full_precision(name):
  model, variables, (_, state) = _run(name)
  inter = state["intermediates"]
  binary, full = [], []
  for path, layer in _layers(inter):
    (kernel,) = layer["kernel"]
    if "input" in layer:
      binary.append(path)
      (a,) = layer["input"]
      assert bool(jnp.all(jnp.abs(a) == 1)), path
      flat = jnp.abs(kernel.reshape(-1, kernel.shape[-1]))
      assert bool(jnp.all(flat == flat[0])) and bool(jnp.all(flat[0] > 0)), path
    else:
      full.append(path)
      np.testing.assert_array_equal(kernel, _at(variables["params"], path)["kernel"])
  assert len(binary) == BINARY_LAYERS[name]
  assert ("stem", "conv") in full and ("head", "fc") in full
  if name in IMAGENET:  # the 1x1 downsample convs are full precision too
    assert len(full) == 2 + 3


def test_mean_abs_scale_in_eval():
  _, variables, (_, state) = _run("resnet20_fda", "fda")
  for path, layer in _layers(state["intermediates"]):
    if "input" not in layer:
      continue
    (kernel,) = layer["kernel"]
    w = _at(variables["params"], path)["kernel"]
    alpha = jnp.mean(jnp.abs(w), axis=(0, 1, 2))
    np.testing.assert_allclose(jnp.abs(kernel), jnp.broadcast_to(alpha, w.shape), rtol=1e-6)
    np.testing.assert_array_equal(jnp.sign(kernel), jnp.where(w >= 0, 1.0, -1.0))


def test_init_values():
  model = models.create("resnet20", NUM_CLASSES, **BIPER)
  # An RBG key compiles far faster on CPU than threefry; the values are as random.
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0, impl="unsafe_rbg"), jnp.zeros((2, 32, 32, 3)))
  params = variables["params"]
  scale = params["block0"]["unit1"]["main"]["conv"]["scale"]  # BiPer's alpha ~ U[0, 1)
  assert scale.shape == (16,) and bool(jnp.all((scale >= 0) & (scale < 1)))
  bn = params["block0"]["unit1"]["main"]["bn"]
  np.testing.assert_array_equal(bn["scale"], 1.0)
  np.testing.assert_array_equal(bn["bias"], 0.0)
  w = params["block8"]["unit2"]["main"]["conv"]["kernel"]  # kaiming normal, fan_in 576
  assert abs(float(jnp.std(w)) - np.sqrt(2 / 576)) < 0.1 * np.sqrt(2 / 576)
  assert "stem" in params and "scale" not in params["stem"]["conv"]


# --------------------------------------------------------------- FDA training


def test_fda_noise_modules_receive_gradients():
  model = models.create("resnet20_fda", NUM_CLASSES, **FDA)
  x = _input("resnet20_fda")
  labels = jnp.array([3, 7])
  variables = _fill(model, x)

  def loss(params):
    with schedule.training_step(*STEP):
      logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                              train=True, mutable=["batch_stats"])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  grads = jax.jit(jax.grad(loss))(variables["params"])
  noise = [(p, g) for p, g in jax.tree_util.tree_leaves_with_path(grads)
           if any(getattr(k, "key", None) in ("kernel_noise", "input_noise") for k in p)]
  assert len(noise) == 2 * 2 * BINARY_LAYERS["resnet20_fda"]  # w1, w2 of both adapters
  for path, g in noise:
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0, path
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert bool(jnp.all(jnp.isfinite(g))), path


# ----------------------------------------------------------- configs and I/O


@pytest.mark.parametrize("quantization", [
    dict(kernel_quantizer={"name": "biper", "omega0": 7}, input_quantizer="approx_sign",
         scaling="learned", prenorm=True),
    dict(kernel_quantizer={"name": "fda", "n_terms": 5, "max_terms": 18, "omega": 0.3,
                           "noise": {"reduction": 8}},
         input_quantizer={"name": "bnn_pp", "beta": {"schedule": "linear", "start": 1, "end": 3}},
         scaling="mean_abs"),
    dict(kernel_quantizer={"name": "ir_net", "balance": True}, input_quantizer="rsign",
         scaling="mean_abs_tensor"),
    dict(kernel_quantizer={"name": "ste", "clip": 1.5}),
    dict(),
], ids=["biper", "fda_bnnpp", "ir_net_rsign", "ste", "twin"])
def test_config_round_trip(quantization):
  model = models.create("resnet20", 100, dtype="bfloat16", **quantization)
  cfg = models.config(model)
  restored = models.from_config(json.loads(json.dumps(cfg)))
  assert restored == model
  assert models.config(restored) == cfg
  assert cfg["name"] == "resnet20" and cfg["num_classes"] == 100 and cfg["dtype"] == "bfloat16"
  assert "axis_name" not in cfg
  assert models.from_config(cfg, axis_name="batch").axis_name == "batch"
  if "kernel_quantizer" not in quantization:
    assert cfg["kernel_quantizer"] == {"name": "identity"}
    assert cfg["input_quantizer"] == {"name": "identity"}


def test_round_trip_keeps_quantizer_parameters_and_outputs():
  model = models.create("resnet20", NUM_CLASSES, kernel_quantizer={"name": "biper", "omega0": 7},
                        input_quantizer="approx_sign", scaling="learned", prenorm=True)
  cfg = json.loads(json.dumps(models.config(model)))
  assert cfg["kernel_quantizer"] == {"name": "biper", "omega0": 7.0, "tau": 0.0}
  restored = models.from_config(cfg)
  x = _input("resnet20")
  variables = _fill(model, x)
  for train in (False, True):
    kw = dict(train=train, mutable=["batch_stats"]) if train else dict(train=train)
    with schedule.training_step(0, 10):
      a, b = model.apply(variables, x, **kw), restored.apply(variables, x, **kw)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(u, v)
  # The default omega0 (20) gives another binary kernel: the parameter matters.
  default = models.create("resnet20", NUM_CLASSES, **BIPER)
  assert not np.array_equal(model.apply(variables, x), default.apply(variables, x))
  fda = models.config(models.create("resnet20_fda", 10, **FDA))
  assert fda["kernel_quantizer"]["n_terms"] == {"schedule": "stepwise", "start": 9.0, "end": 18.0,
                                                "per": "epoch"}
  bnn = models.config(models.create("vgg_small", 10, kernel_quantizer={"name": "bnn_pp",
                                                                         "beta": 2.5}))
  assert json.loads(json.dumps(bnn))["kernel_quantizer"] == {"name": "bnn_pp", "beta": 2.5}


@pytest.mark.parametrize("call, match", [
    (lambda: models.create("resnet50", 10), "unknown model 'resnet50'.*resnet20_fda"),
    (lambda: models.create("resnet20", 0), "num_classes"),
    (lambda: models.create("resnet20", 2.5), "num_classes"),
    (lambda: models.create("resnet20", 10, kernel_quantizer="sgn"), "unknown quantizer 'sgn'"),
    (lambda: models.create("resnet20", 10, input_quantizer={"name": "fda", "omega": -1.0}),
     "omega"),
    (lambda: models.create("resnet20", 10, scaling="max"), "scaling='max'"),
    (lambda: models.create("resnet20", 10, prenorm="yes"), "prenorm"),
    (lambda: models.create("resnet20", 10, kernel_noise={"k": 64}), "kernel_noise was removed"),
    (lambda: models.create("resnet20", 10, kernel_quantizer={"name": "fda", "noise": {"k": 64}}),
     r"noise takes no option \['k'\]"),
    (lambda: models.create("resnet20", 10, bn_scale_init=0.0), "bn_scale_init=0.0"),
    (lambda: models.create("resnet20", 10, kernel_quantiser="biper"), "kernel_quantiser"),
    (lambda: models.create("resnet20", 10, dtype="int8"), "dtype"),
    (lambda: models.from_config({"num_classes": 10}), "name"),
    (lambda: models.config(object()), "neither a model of the zoo"),
])
def test_bad_arguments_raise_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_unknown_model_message_is_one_line():
  with pytest.raises(ValueError) as e:
    models.create("alexnet", 10)
  assert "\n" not in str(e.value)
  assert all(n in str(e.value) for n in models.NAMES)


# ------------------------------------------------------ precision and devices


def test_bfloat16_compute_gives_float32_logits():
  model = models.create("resnet20", NUM_CLASSES, dtype=jnp.bfloat16, **BIPER)
  x = _input("resnet20")
  variables = _fill(model, x)
  logits, updates = _train(model, variables, x, mutable=["batch_stats"])
  eval_logits = model.apply(variables, x, train=False)
  for y in (logits, eval_logits):
    assert y.dtype == jnp.float32 and y.shape == (2, NUM_CLASSES)
    assert bool(jnp.all(jnp.isfinite(y)))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(updates["batch_stats"]))


def _conv_operand_dtypes(jaxpr) -> set[tuple[str, ...]]:
  """Operand dtypes of every convolution in a jaxpr, sub-jaxprs (custom_vjp, pjit) included."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found |= _conv_operand_dtypes(inner)
  return found


@pytest.mark.parametrize("quantization", [BIPER, FDA], ids=["biper", "fda_noise"])
def test_bfloat16_training_runs_every_convolution_in_bfloat16(quantization):
  """Forward and backward: no float32 schedule value (alpha) promotes a conv to float32."""
  model = models.create("resnet20", NUM_CLASSES, dtype=jnp.bfloat16, **quantization)
  x = _input("resnet20")
  variables = _fill(model, x)

  def loss(params):
    with schedule.training_step(*STEP):
      y, _ = model.apply({**variables, "params": params}, x, train=True,
                         mutable=["batch_stats", "losses"])
    return jnp.sum(y)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"]).jaxpr
  assert _conv_operand_dtypes(jaxpr) == {("bfloat16", "bfloat16")}


def test_batch_norm_statistics_are_averaged_across_devices():
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = models.create("resnet20", NUM_CLASSES, axis_name="batch", **BIPER)
  single = models.create("resnet20", NUM_CLASSES, **BIPER)
  x = _input("resnet20", batch=16)
  variables = _fill(single, x)

  def step(variables, x):
    return sharded.apply(variables, x, train=True, mutable=["batch_stats"])

  # out_specs P() for batch_stats: shard_map (check_vma) refuses per-device
  # values, so this also fails if a BatchNorm ignored axis_name.
  logits, state = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("batch")),
                                        out_specs=(P("batch"), P())))(variables, x)
  ref_logits, ref_state = _train(single, variables, x, mutable=["batch_stats"])
  paths = jax.tree_util.tree_leaves_with_path(state["batch_stats"])
  assert len(paths) == 2 * (1 + 18 + 1)  # mean and var of every BatchNorm
  for (path, a), b in zip(paths, jax.tree.leaves(ref_state["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=str(path))
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
