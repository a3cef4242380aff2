"""Export of a trained binary network to one packed, self-describing file.

`export(model, variables, input_shape)` turns a model of the zoo and its
variables into a `Packed` network; `export_checkpoint(workdir)` does so from
a training run's checkpoint, with the model configuration saved in it.
`save` / `load` write and read the file; `inference.Predictor(packed)` runs it.

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

File format 'fda_biper_jax.packed', version 1 (integers little-endian):

    magic    8 bytes   b"FBJ-PACK"
    L        uint64    length of the header in bytes
    digest   32 bytes  SHA-256 of the header
    header   L bytes   UTF-8 JSON, below
    payload            the arrays' bytes (C order, little-endian), back to
                       back in the order of header["arrays"]; nothing follows

    header = {
      "format": "fda_biper_jax.packed", "version": 1,
      "model": models.config(model): name, num_classes, dtype and every
               quantizer setting; `models.from_config` rebuilds the model,
      "input_shape": [H, W, C], the per-example input the export traced,
      "source_params": the number of parameters of the exported model,
      "layers": {module path: {"type": "conv" | "dense",
                               "kernel_shape": latent kernel shape (HWIO / [in, out]),
                               "reduction": K, "kernel_quantizer": its config,
                               "input_quantizer": its config or null,
                               "binary_input": whether the xor-popcount path runs,
                               "scaling": one of layers.SCALINGS,
                               "prenorm": whether the layer normalises its input,
                               "input_aux": names of the input quantizer's learned
                                            arrays (ReActNet's thresholds), or [],
                               "folded_bn": the folded BatchNorm's path or null}},
      "arrays": {name: {"dtype": "uint32" | "float32", "shape": [...],
                        "offset": from the payload start, "nbytes": ...,
                        "sha256": hex digest of the bytes}},
    }

Array names: "packed/<layer path>/kernel" (uint32 [Cout, ceil(K / 32)],
unused tail bits 0), "packed/<layer path>/scale" and ".../bias" (float32
[Cout]), "packed/<layer path>/input_aux/<name>" (float32) for a deployed
form with learned parts; "float/<collection>/<module path>/<variable>" for
the float variables. Every byte of the file is covered by the magic, a length, or a
checksum: `load` rejects a truncated, extended, tampered, wrong-format,
wrong-version or internally inconsistent file with one ValueError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from flax import traverse_util

from fda_biper_jax import checkpoints, data, inference, layers, models, trace, train
from fda_biper_jax.layers import BinaryConv, BinaryDense
from fda_biper_jax.models.blocks import ConvUnit

FORMAT = "fda_biper_jax.packed"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAGIC = b"FBJ-PACK"
_PREAMBLE = struct.Struct("<8sQ32s")  # magic, header length, header SHA-256
DTYPES = ("uint32", "float32")
WHICH = ("latest", "best")


@dataclasses.dataclass(frozen=True)
class Packed:
  """An exported network: the JSON header and its named numpy arrays.

  `header` is as in the module docstring, without "arrays" (written by
  `to_bytes` from `arrays`).
  """
  header: Mapping[str, Any]
  arrays: Mapping[str, np.ndarray]

  def model(self) -> nn.Module:
    return models.from_config(self.header["model"])

  def layer_arrays(self) -> dict[str, dict[str, Any]]:
    """{layer path: {'kernel', 'scale', 'bias', 'input_aux'}} of the packed layers
    ('input_aux': the input quantizer's learned arrays as a tree, or None)."""
    out = {}
    for p, entry in self.header["layers"].items():
      arrays = {k: self.arrays[f"packed/{p}/{k}"] for k in ("kernel", "scale", "bias")}
      names = entry.get("input_aux") or []
      arrays["input_aux"] = (traverse_util.unflatten_dict(
          {n: self.arrays[f"packed/{p}/input_aux/{n}"] for n in names}, sep="/")
          if names else None)
      out[p] = arrays
    return out

  def float_variables(self) -> dict[str, Any]:
    """The float variables as a Flax variables tree {'params': ..., 'batch_stats': ...}."""
    flat = {k[len("float/"):]: v for k, v in self.arrays.items() if k.startswith("float/")}
    return traverse_util.unflatten_dict(flat, sep="/")

  def sizes(self) -> dict[str, Any]:
    """The file's bytes against the float32 bytes of the source model's parameters."""
    f32 = 4 * int(self.header["source_params"])
    size = len(to_bytes(self))
    return {"file_bytes": size, "float32_param_bytes": f32, "ratio": size / f32}


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
  q = layers.resolve(getattr(module, f"{role}_quantizer"))
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
  q = layers.resolve(module.kernel_quantizer)
  signs = jax.jit(lambda w, aux: q.binarize(w, aux, "kernel"))(w, _aux(module, params, "kernel"))
  bits = np.asarray(signs).reshape(-1, module.features).T < 0  # [Cout, K]
  scale = layers.kernel_scale(module.scaling, jnp.asarray(w))
  if scale is not None:
    scale = np.asarray(scale, np.float32)
  elif module.scaling == "learned":
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
  qi = layers.resolve(module.input_quantizer)
  aux = _aux(module, params, "input")
  return {"type": "conv" if isinstance(module, BinaryConv) else "dense",
          "kernel_shape": shape, "reduction": int(np.prod(shape[:-1])),
          "kernel_quantizer": layers.resolve(module.kernel_quantizer).config(),
          "input_quantizer": None if qi is None else qi.config(),
          "binary_input": bool(qi is not None and qi.is_binary),
          "scaling": module.scaling, "prenorm": bool(module.prenorm),
          "input_aux": [] if aux is None else sorted(traverse_util.flatten_dict(
              jax.device_get(aux), sep="/")),
          "folded_bn": folded_bn}


def export(model: nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int]) -> Packed:
  """The packed network of a zoo `model` with `variables` ({'params', 'batch_stats'}).

  Args:
    model: a model of `models` (its `models.config` goes into the file).
    variables: its trained variables.
    input_shape: one example's shape (H, W, C), e.g. (32, 32, 3).

  Raises:
    ValueError: the model is not of the zoo (variables that do not fit it
      fail in Flax, as in `model.apply`).
  """
  config = models.config(model)
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


def _image_shape(config) -> tuple[int, ...]:
  if config.dataset == "synthetic":
    return tuple(int(d) for d in config.synthetic.image_shape)
  return data.info(config.dataset).image_shape


def restore(workdir: str, which: str = "latest") -> tuple[nn.Module, dict, tuple, int]:
  """(model, variables, image shape, step) of a run's latest or best checkpoint.

  The model is rebuilt from the configuration saved with the checkpoint and
  the image shape read from its training config; the state is restored onto
  a template traced with `jax.eval_shape` (nothing is initialised), on one
  device whatever the run's device count.

  Raises:
    ValueError: `which` is not 'latest' or 'best', or the workdir holds no
      such readable checkpoint.
  """
  if which not in WHICH:
    raise ValueError(f"which={which!r} is not allowed; allowed: {list(WHICH)}")
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"workdir={workdir!r} holds no checkpoints/ folder (a training run's "
                     "workdir is expected)")
  ckpts = checkpoints.Checkpoints(workdir)
  try:
    meta = ckpts.read_meta(which)
    if meta is None:
      raise ValueError(f"workdir={workdir!r} holds no {which} checkpoint")
    model = models.from_config(meta["model"])
    saved = ml_collections.ConfigDict(meta["config"])
    shape = _image_shape(saved)
    tx = train.make_optimizer(saved, train.learning_rate(saved, 1))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    template = jax.eval_shape(lambda: train.create_state(model, tx, jax.random.key(0), shape))
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            template)
    found = ckpts.restore_best(template) if which == "best" else ckpts.restore_latest(template)
  finally:
    ckpts.close()
  if found is None:
    raise ValueError(f"workdir={workdir!r}: no {which} checkpoint could be read")
  step, state, _ = found
  return model, {"params": state.params, "batch_stats": state.batch_stats}, shape, int(step)


def export_checkpoint(workdir: str, out: str, which: str = "latest") -> dict[str, Any]:
  """Exports a run's latest (or best) checkpoint to the file `out`; returns a report.

  The report: model name, step, the file's bytes, the float32 bytes of the
  model's parameters and their ratio, the orbax step folder's bytes, the
  packed layers and folded BatchNorms. The file is read back (and so
  validated) before returning.
  """
  model, variables, shape, step = restore(workdir, which)
  packed = export(model, variables, shape)
  save(packed, out)
  load(out)
  folder = os.path.join(workdir, "best" if which == "best" else "checkpoints", str(step))
  folder_bytes = sum(os.path.getsize(os.path.join(d, f))
                     for d, _, files in os.walk(folder) for f in files)
  layers = packed.header["layers"]
  return {"model": packed.header["model"]["name"], "step": step, "which": which, "out": out,
          **packed.sizes(), "checkpoint_bytes": folder_bytes,
          "packed_layers": len(layers),
          "folded_batch_norms": sum(e["folded_bn"] is not None for e in layers.values())}


# --------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------


def to_bytes(packed: Packed) -> bytes:
  """The file's bytes (module docstring)."""
  index, offset, chunks = {}, 0, []
  for name, a in packed.arrays.items():
    a = np.ascontiguousarray(a)
    if a.dtype.name not in DTYPES:
      raise ValueError(f"array {name!r} has dtype {a.dtype}; allowed: {list(DTYPES)}")
    raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
    index[name] = {"dtype": a.dtype.name, "shape": list(a.shape), "offset": offset,
                   "nbytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    offset += len(raw)
    chunks.append(raw)
  header = json.dumps({**packed.header, "arrays": index}).encode("utf-8")
  return _PREAMBLE.pack(MAGIC, len(header), hashlib.sha256(header).digest()) + header + \
      b"".join(chunks)


def save(packed: Packed, path: str) -> None:
  """Writes `packed` to `path` (atomically: a temporary file, then a rename)."""
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(to_bytes(packed))
  os.replace(tmp, path)


def _array(data: memoryview, name: str, entry: Mapping[str, Any], start: int) -> np.ndarray:
  if entry.get("dtype") not in DTYPES:
    raise ValueError(f"array {name!r} has dtype {entry.get('dtype')!r}; allowed: {list(DTYPES)}")
  dtype = np.dtype(entry["dtype"]).newbyteorder("<")
  shape = tuple(entry["shape"])
  if any(not isinstance(d, int) or d < 0 for d in shape) or \
      entry["nbytes"] != int(np.prod(shape)) * dtype.itemsize:
    raise ValueError(f"array {name!r}: shape {list(shape)} does not match its "
                     f"{entry['nbytes']} bytes of {entry['dtype']}")
  raw = data[start + entry["offset"]:start + entry["offset"] + entry["nbytes"]]
  if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
    raise ValueError(f"array {name!r} fails its SHA-256 checksum: the file was modified or "
                     "corrupted")
  return np.frombuffer(raw, dtype).astype(dtype.newbyteorder("=")).reshape(shape)


def _check_layers(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
  """Shapes and dtypes of each packed layer's arrays; no stray or missing array."""
  expected = {k for k in arrays if k.startswith("float/")}
  for path, e in header["layers"].items():
    shape = tuple(e["kernel_shape"])
    cout, k = shape[-1], int(np.prod(shape[:-1]))
    want = {"kernel": ("uint32", (cout, inference.num_words(k))),
            "scale": ("float32", (cout,)), "bias": ("float32", (cout,))}
    if e["reduction"] != k:
      raise ValueError(f"layer {path}: reduction {e['reduction']} does not match its kernel "
                       f"shape {list(shape)} (K = {k})")
    for part, (dtype, s) in want.items():
      name = f"packed/{path}/{part}"
      a = arrays.get(name)
      if a is None or a.dtype.name != dtype or a.shape != s:
        got = "missing" if a is None else f"{a.dtype.name} {list(a.shape)}"
        raise ValueError(f"array {name!r} is {got}; layer {path} needs {dtype} {list(s)}")
      expected.add(name)
    for aux in e.get("input_aux") or []:
      name = f"packed/{path}/input_aux/{aux}"
      a = arrays.get(name)
      if a is None or a.dtype.name != "float32":
        got = "missing" if a is None else a.dtype.name
        raise ValueError(f"array {name!r} is {got}; layer {path} needs float32")
      expected.add(name)
    tail = k % inference.WORD_BITS
    if tail and np.any(arrays[f"packed/{path}/kernel"][:, -1] >> np.uint32(tail)):
      raise ValueError(f"layer {path}: the unused tail bits of its packed kernel are not 0")
  stray = set(arrays) - expected
  if stray:
    raise ValueError(f"arrays {sorted(stray)[:5]} belong to no packed layer and are not float "
                     "variables")


def from_bytes(data: bytes) -> Packed:
  """Parses and validates a file's bytes (module docstring); ValueError if bad."""
  view = memoryview(data)
  head = bytes(view[:len(MAGIC)])
  if head != MAGIC[:len(head)]:
    raise ValueError(f"not a {FORMAT} file: it starts with {head!r}, not the magic {MAGIC!r}")
  if len(data) < _PREAMBLE.size:
    raise ValueError(f"the file is truncated: {len(data)} bytes, fewer than the "
                     f"{_PREAMBLE.size}-byte preamble")
  _, length, digest = _PREAMBLE.unpack_from(view)
  start = _PREAMBLE.size + length
  if len(data) < start:
    raise ValueError(f"the file is truncated: {len(data)} bytes, its header ends at byte {start}")
  raw = view[_PREAMBLE.size:start]
  if hashlib.sha256(raw).digest() != digest:
    raise ValueError("the header fails its SHA-256 checksum: the file was modified or corrupted")
  try:
    header = json.loads(bytes(raw).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"the header is not valid JSON: {e}") from None
  if not isinstance(header, dict):
    raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
  if header.get("format") != FORMAT:
    raise ValueError(f"format={header.get('format')!r} is not supported; allowed: {FORMAT!r}")
  if header.get("version") not in SUPPORTED_VERSIONS:
    raise ValueError(f"format version {header.get('version')!r} is not supported; "
                     f"supported: {list(SUPPORTED_VERSIONS)}")
  missing = {"model", "input_shape", "source_params", "layers", "arrays"} - set(header)
  if missing:
    raise ValueError(f"the header lacks {sorted(missing)}")
  index = header.pop("arrays")
  end = start + sum(e["nbytes"] for e in index.values())
  if len(data) != end:
    raise ValueError(f"the file is {'truncated' if len(data) < end else 'too long'}: "
                     f"{len(data)} bytes, its header describes {end}")
  offset = 0
  for name, e in index.items():
    if e["offset"] != offset:
      raise ValueError(f"array {name!r} starts at payload byte {e['offset']}, not {offset}: "
                       "arrays must lie back to back")
    offset += e["nbytes"]
  arrays = {name: _array(view, name, e, start) for name, e in index.items()}
  _check_layers(header, arrays)
  packed = Packed(header, arrays)
  inference.Predictor(packed).check(header["input_shape"])
  return packed


def load(path: str) -> Packed:
  """Reads and validates the file at `path`; ValueError if it is not a valid one."""
  with open(path, "rb") as f:
    return from_bytes(f.read())
