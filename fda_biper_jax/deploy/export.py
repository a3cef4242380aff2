"""Export of a trained binary network to one packed, self-describing file.

`export(model, variables, input_shape)` turns a model and its variables into
a `Packed` network (`packed`: the file; `packed.save` writes it);
`inference.Predictor(packed)` runs it. A training run's checkpoint restores
as (model, variables) with `fda_biper_jax.train.runs.restore`.
`stablehlo(packed)` turns that predictor into a self-contained `jax.export`
artifact (`deploy.stablehlo`), which runs without this package's models.

What is exported (XNOR-Net's deployment, Rastegari et al. 2016):

* packed: every `BinaryConv` / `BinaryDense` whose kernel quantizer is binary
  (`Quantizer.is_binary`). Its kernel is binarized once with the layer's own
  quantizer, `q.binarize(W)` (sign, or BiPer's sign(sin(omega0 W))), exactly
  as the layer does in evaluation, flattened to [K, Cout] (HWIO order for a
  conv, K = kh kw Cin; K = Cin for dense), transposed to [Cout, K] and packed
  32 per uint32 along K (`inference.pack_bits`). Per output channel: a
  float32 scale s (mean |W_c| for scaling 'mean_abs', the learned 'scale'
  for 'learned', 1 for 'none') and bias b (the layer's bias, or 0), so the
  layer computes dot * s + b.
* folded: the BatchNorm of a `ConvUnit` whose conv is packed, when it is an
  affine map of the conv's output. BN(z) = z m + (beta - mu m) with
  m = gamma / sqrt(var + eps), so BN(dot s + b) = dot (s m) + (b m + beta - mu m).
  FDA's unit, conv -> PReLU -> BN, is never folded. VGG-Small's unit,
  conv -> 2x2 max-pool -> BN, is folded only when every m_c >= 0: max-pooling
  commutes with z -> z m + c only for m >= 0 (a negative m turns the max into
  a min). An unfolded BatchNorm stays a float op.
* float: every other variable (stem, head, 1x1 downsample convs, unfolded
  BatchNorms, PReLU slopes), as float32. FDA's noise adapters, which the
  evaluation forward never uses, are dropped.

The file holds no graph: the network's structure is the zoo's own model
definition, rebuilt from the saved `models.config`, and `inference.Predictor`
applies it with the packed layers swapped in through
`flax.linen.intercept_methods`. So no architecture is written twice, and the
packed layers and folds are found the same way: `export` traces the eval
forward (`jax.eval_shape`, nothing runs) under an interceptor that records
every module called, by path.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from jax import lax

from fda_biper_jax import methods, models, trace
from fda_biper_jax.deploy import inference
from fda_biper_jax.deploy import packed as packed_lib
from fda_biper_jax.deploy import stablehlo as stablehlo_lib
from fda_biper_jax.deploy.packed import FORMAT, VERSION, Packed
from fda_biper_jax.models.blocks import ConvUnit
from fda_biper_jax.nn import linen as layers
from fda_biper_jax.nn.linen import BinaryConv, BinaryDense


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def _path(*parts: str) -> str:
  return "/".join(p for p in parts if p)


def _node(tree: Mapping[str, Any], path: str) -> Mapping[str, Any]:
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _modules(model: nn.Module, variables, input_shape: Sequence[int]) -> dict[str, nn.Module]:
  """{path: module} of every module the eval forward calls (traced, nothing runs)."""
  calls, _ = trace.calls(model, input_shape, variables=variables, train=False)
  return {c.path: c.module for c in calls}


def _is_packed(module: nn.Module) -> bool:
  return trace.is_binary(module)


def _aux(module, params, role: str):
  """A layer's learned quantizer parts for `role` from its params, or None."""
  q = getattr(module.settings(), f"{role}_quantizer")
  if q is None or not q.has_aux(role):
    return None
  return params[f"{role}_{q.aux_name}"]


def _bn_affine(bn: nn.BatchNorm, params, stats) -> tuple[np.ndarray, np.ndarray]:
  """(m, c), float32, with BN(z) = z m + c in evaluation (flax's BatchNorm)."""
  m = 1 / np.sqrt(np.asarray(stats["var"], np.float32) + np.float32(bn.epsilon))
  if bn.use_scale:
    m = m * np.asarray(params["scale"], np.float32)
  c = -np.asarray(stats["mean"], np.float32) * m
  if bn.use_bias:
    c = c + np.asarray(params["bias"], np.float32)
  return m, c


def _folds(modules: Mapping[str, nn.Module], variables) -> dict[str, tuple[str, tuple]]:
  """{packed conv path: (BatchNorm path, (m, c))} of the exact folds (module docstring)."""
  folds = {}
  for path, unit in modules.items():
    if not isinstance(unit, ConvUnit) or unit.activation_first:
      continue
    conv, bn = _path(path, "conv"), _path(path, "bn")
    if not _is_packed(modules.get(conv)):
      continue
    m, c = _bn_affine(modules[bn], _node(variables["params"], bn),
                      _node(variables["batch_stats"], bn))
    if not unit.pool or np.all(m >= 0):
      folds[conv] = (bn, (m, c))
  return folds


def _pack_layer(module: BinaryConv | BinaryDense, params, bn_affine) -> dict[str, np.ndarray]:
  """Packed kernel, scale and bias of a layer, BatchNorm (m, c) folded in if given."""
  w = np.asarray(params["kernel"], np.float32)
  s = module.settings()
  q = s.kernel_quantizer
  signs = methods.binarize_compiled(q, w, _aux(module, params, "kernel"), "kernel")
  if module.mask is not None:  # a masked weight is 0: no binary encoding (module docstring)
    raise ValueError(f"export: layer {'/'.join(module.path)} has a mask; masked binary "
                     "layers cannot be packed")
  bits = np.asarray(signs).reshape(-1, module.features).T < 0  # [Cout, K]
  scale = layers.kernel_scale(s.scaling, jnp.asarray(w))
  if scale is not None:
    scale = np.asarray(scale, np.float32)
  elif s.scaling == "learned":
    scale = np.asarray(params["scale"], np.float32)
  else:
    scale = np.ones((module.features,), np.float32)
  bias = (np.asarray(params["bias"], np.float32) if module.use_bias
          else np.zeros((module.features,), np.float32))
  if bn_affine is not None:
    m, c = bn_affine
    scale, bias = scale * m, bias * m + c
  out = {"kernel": inference.pack_bits(bits), "scale": scale.astype(np.float32),
         "bias": bias.astype(np.float32)}
  aux = _aux(module, params, "input")
  if aux is not None:
    for name, v in traverse_util.flatten_dict(jax.device_get(aux), sep="/").items():
      out[f"input_aux/{name}"] = np.asarray(v, np.float32)
  return out


def _layer_entry(module: BinaryConv | BinaryDense, params, folded_bn: str | None) -> dict:
  shape = [int(d) for d in params["kernel"].shape]
  s = module.settings()
  qi = s.input_quantizer
  aux = _aux(module, params, "input")
  return {"type": "conv" if isinstance(module, BinaryConv) else "dense",
          "kernel_shape": shape, "reduction": int(np.prod(shape[:-1])),
          "kernel_quantizer": s.kernel_quantizer.config(),
          "input_quantizer": None if qi is None else qi.config(),
          "binary_input": s.binary_input,
          "scaling": s.scaling, "prenorm": s.prenorm,
          "input_aux": [] if aux is None else sorted(traverse_util.flatten_dict(
              jax.device_get(aux), sep="/")),
          "folded_bn": folded_bn}


def export(model: nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int]) -> Packed:
  """The packed network of `model` with `variables` ({'params', 'batch_stats'}).

  Args:
    model: any model built from the library's layers (or `binarize`d); a zoo or
      factory model's `models.config` goes into the file, which then rebuilds it.
    variables: its trained variables.
    input_shape: one example's shape (H, W, C), e.g. (32, 32, 3).

  Variables that do not fit the model fail in Flax, as in `model.apply`.
  """
  try:
    config = models.config(model)
  except ValueError:
    config = None  # not rebuildable from the file: Predictor(packed, model=model)
  variables = jax.device_get(dict(variables))
  input_shape = [int(d) for d in input_shape]
  mods = _modules(model, variables, input_shape)
  folds = _folds(mods, variables)
  layers, arrays = {}, {}
  for path, module in mods.items():
    if not _is_packed(module):
      continue
    params = _node(variables["params"], path)
    bn, affine = folds.get(path, (None, None))
    layers[path] = _layer_entry(module, params, bn)
    for k, v in _pack_layer(module, params, affine).items():
      arrays[f"packed/{path}/{k}"] = v
  dropped = tuple(f"{p}/" for p in (*layers, *(bn for bn, _ in folds.values())))
  for key, v in traverse_util.flatten_dict(variables, sep="/").items():
    if not key.split("/", 1)[1].startswith(dropped):
      arrays[f"float/{key}"] = np.asarray(v, np.float32)
  source = sum(int(np.size(v)) for v in jax.tree.leaves(variables["params"]))
  header = {"format": FORMAT, "version": VERSION, "model": config, "input_shape": input_shape,
            "source_params": source, "layers": layers}
  return Packed(header, arrays)


# --------------------------------------------------------------------------
# StableHLO
# --------------------------------------------------------------------------


def _input_spec(batch_size: int | None, input_shape: Sequence[int]) -> jax.ShapeDtypeStruct:
  """float32 [batch, H, W, C]: a symbolic batch dimension 'b' when batch_size is None."""
  if batch_size is None:
    dims = jax.export.symbolic_shape(", ".join(["b", *map(str, input_shape)]))
  elif isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1:
    dims = (batch_size, *input_shape)
  else:
    raise ValueError(f"batch_size={batch_size!r}: a positive int, or None for any batch size")
  return jax.ShapeDtypeStruct(tuple(dims), jnp.float32)


def _check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  platforms = tuple(platforms)
  unknown = [p for p in platforms if p not in stablehlo_lib.KNOWN_PLATFORMS]
  if unknown or not platforms:
    raise ValueError(f"platforms={list(platforms)}: one or more of "
                     f"{list(stablehlo_lib.KNOWN_PLATFORMS)}")
  return platforms


def _with_constants(predictor: inference.Predictor):
  """images -> logits, the predictor's arrays closed over (constants of the program),
  behind an optimization barrier so that XLA cannot fold them into the arithmetic."""
  return lambda images: predictor.apply(lax.optimization_barrier(predictor.operands), images)


def stablehlo(network: Packed | str, *, batch_size: int | None = None,
              platforms: Sequence[str] = stablehlo_lib.PLATFORMS,
              model: nn.Module | None = None) -> stablehlo_lib.Artifact:
  """The packed network's predictor as a `jax.export` artifact (`deploy.stablehlo`).

  The exported function is `inference.Predictor(network)`'s images -> logits
  (the XNOR-popcount path, BatchNorms folded) with every array baked in, so
  the artifact needs nothing but jax to run: `stablehlo.save(artifact, path)`
  writes it, `stablehlo.load(path)` reads it back.

  The arrays sit behind `lax.optimization_barrier`: the program XLA compiles
  is then the Predictor's own, whose arrays are arguments, and on CPU the
  logits equal the Predictor's bit for bit (measured on every model of the
  zoo). Folded into the arithmetic as constants, they gave logits a few
  float32 ulps away.

  Args:
    network: a `Packed` network, or the path of a packed file.
    batch_size: None (default) exports a symbolic batch dimension, so one
      artifact takes any batch size of at least 1 (every model of the zoo
      traces with it); an int fixes it.
    platforms: the platforms the artifact is lowered for, any of 'cpu',
      'cuda', 'rocm', 'tpu'. Lowering needs none of them present: the
      default, cpu + cuda + tpu, lowers on a CPU-only machine and adds 0.1%
      (resnet18) to 1.4% (tiny_cnn) to the file. The artifact runs on
      whichever of its platforms the loading process has.
    model: the network's Flax model, for a file that cannot rebuild it
      (as in `inference.Predictor`).

  Raises:
    ValueError: a bad file or batch_size, or arrays that do not fit the model.
  """
  platforms = _check_platforms(platforms)
  if not isinstance(network, Packed):
    network = packed_lib.load(network)
  input_shape = [int(d) for d in network.header["input_shape"]]
  spec = _input_spec(batch_size, input_shape)
  predictor = inference.Predictor(network, model=model)
  predictor.check(input_shape)
  exported = jax.export.export(jax.jit(_with_constants(predictor)), platforms=platforms)(spec)
  return stablehlo_lib.Artifact(exported, {"model": network.header["model"],
                                           "input_shape": input_shape, "jax": jax.__version__})
