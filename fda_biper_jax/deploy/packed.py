"""The bit-packed network file: a safetensors file, every byte checked.

The container is safetensors (an 8-byte length, a JSON header, the raw
little-endian arrays; readers exist in Python, Rust, C++ and JavaScript), so
any of them reads the packed weights. The file's `__metadata__` (strings)
holds:

    "format":  "fda_biper_jax.packed"     "version": "2"
    "header":  the network's description, JSON (below)
    "sha256":  JSON {array name: SHA-256 of its bytes, "header": of the header}

    header = {
      "model": models.config(model) (name, num_classes, dtype and every
               quantizer setting; `models.from_config` rebuilds the model), or
               null for a model that the file cannot rebuild,
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
    }

Array names (dtypes U32 and F32): "packed/<layer path>/kernel" (uint32
[Cout, ceil(K / 32)], 32 signs per word, unused tail bits 0),
"packed/<layer path>/scale" and ".../bias" (float32 [Cout]),
"packed/<layer path>/input_aux/<name>" (float32) for a deployed form with
learned parts; "float/<collection>/<module path>/<variable>" for the float
variables. `load` rejects a truncated, extended, tampered, wrong-format,
wrong-version or internally inconsistent file with one ValueError: the
safetensors structure is checked by its reader, every array and the header
by their SHA-256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from typing import Any, Mapping

import numpy as np
import safetensors
import safetensors.numpy
from flax import linen as nn
from flax import traverse_util

from fda_biper_jax import models

FORMAT = "fda_biper_jax.packed"
VERSION = 2
SUPPORTED_VERSIONS = (2,)
DTYPES = ("uint32", "float32")
WORD_BITS = 32  # a packed kernel holds 32 signs per uint32 word


def num_words(length: int) -> int:
  """uint32 words that hold `length` bits."""
  return -(-length // WORD_BITS)


@dataclasses.dataclass(frozen=True)
class Packed:
  """An exported network: the JSON header and its named numpy arrays.

  `header` is as in the module docstring, without "arrays" (written by
  `to_bytes` from `arrays`).
  """
  header: Mapping[str, Any]
  arrays: Mapping[str, np.ndarray]

  def model(self) -> nn.Module:
    """The network's model, rebuilt from the file's configuration."""
    if self.header["model"] is None:
      raise ValueError("this file's model is neither a zoo nor a factory model, so the file "
                       "cannot rebuild it: pass it, inference.Predictor(packed, model=model)")
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
# The file
# --------------------------------------------------------------------------


def _sha256(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"))
                        .tobytes()).hexdigest()


def to_bytes(packed: Packed) -> bytes:
  """The file's bytes (module docstring)."""
  arrays = {}
  for name, a in packed.arrays.items():
    a = np.ascontiguousarray(a)
    if a.dtype.name not in DTYPES:
      raise ValueError(f"array {name!r} has dtype {a.dtype}; allowed: {list(DTYPES)}")
    arrays[name] = a
  header = json.dumps(dict(packed.header), sort_keys=True)
  sums = {name: _sha256(a) for name, a in arrays.items()}
  sums["header"] = hashlib.sha256(header.encode("utf-8")).hexdigest()
  return safetensors.numpy.save(arrays, metadata={
      "format": FORMAT, "version": str(VERSION), "header": header,
      "sha256": json.dumps(sums, sort_keys=True)})


def save(packed: Packed, path: str) -> None:
  """Writes `packed` to `path` (atomically: a temporary file, then a rename)."""
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(to_bytes(packed))
  os.replace(tmp, path)


def _check_layers(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
  """Shapes and dtypes of each packed layer's arrays; no stray or missing array."""
  expected = {k for k in arrays if k.startswith("float/")}
  for path, e in header["layers"].items():
    shape = tuple(e["kernel_shape"])
    cout, k = shape[-1], int(np.prod(shape[:-1]))
    want = {"kernel": ("uint32", (cout, num_words(k))),
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
    tail = k % WORD_BITS
    if tail and np.any(arrays[f"packed/{path}/kernel"][:, -1] >> np.uint32(tail)):
      raise ValueError(f"layer {path}: the unused tail bits of its packed kernel are not 0")
  stray = set(arrays) - expected
  if stray:
    raise ValueError(f"arrays {sorted(stray)[:5]} belong to no packed layer and are not float "
                     "variables")


def _metadata(data: bytes) -> dict[str, str]:
  """The safetensors header's `__metadata__` (its reader checks the rest)."""
  if len(data) < 8:
    raise ValueError(f"the file is truncated: {len(data)} bytes, fewer than safetensors' "
                     "8-byte header length")
  (length,) = struct.unpack("<Q", data[:8])
  if len(data) < 8 + length:
    raise ValueError(f"the file is truncated: {len(data)} bytes, its safetensors header ends "
                     f"at byte {8 + length}")
  try:
    index = json.loads(data[8:8 + length].decode("utf-8"))
    meta = index.pop("__metadata__", None)
    end = 8 + length + max((int(e["data_offsets"][1]) for e in index.values()), default=0)
  except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError,
          IndexError) as e:
    raise ValueError(f"not a safetensors file: its header is not one ({e})") from None
  if len(data) != end:
    raise ValueError(f"the file is {'truncated' if len(data) < end else 'too long'}: "
                     f"{len(data)} bytes, its header describes {end}")
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    got = None if not isinstance(meta, dict) else meta.get("format")
    raise ValueError(f"format={got!r} is not supported; a {FORMAT!r} safetensors file is "
                     "required")
  if meta.get("version") not in {str(v) for v in SUPPORTED_VERSIONS}:
    raise ValueError(f"format version {meta.get('version')!r} is not supported; "
                     f"supported: {list(SUPPORTED_VERSIONS)}")
  return meta


def from_bytes(data: bytes) -> Packed:
  """Parses and validates a file's bytes (module docstring); ValueError if bad."""
  meta = _metadata(bytes(data))
  try:
    arrays = safetensors.numpy.load(bytes(data))
  except (safetensors.SafetensorError, ValueError) as e:
    raise ValueError(f"the file is invalid: safetensors cannot read it "
                     f"({str(e).splitlines()[0]})") from None
  try:
    sums, header = json.loads(meta["sha256"]), meta["header"]
  except (KeyError, json.JSONDecodeError):
    raise ValueError("the file's metadata lacks its header or checksums") from None
  if hashlib.sha256(header.encode("utf-8")).hexdigest() != sums.get("header"):
    raise ValueError("the header fails its SHA-256 checksum: the file was modified or corrupted")
  for name, a in arrays.items():
    if a.dtype.name not in DTYPES:
      raise ValueError(f"array {name!r} has dtype {a.dtype}; allowed: {list(DTYPES)}")
    if _sha256(a) != sums.get(name):
      raise ValueError(f"array {name!r} fails its SHA-256 checksum: the file was modified or "
                       "corrupted")
  if set(sums) - {"header"} != set(arrays):
    raise ValueError(f"the file lacks arrays {sorted(set(sums) - {'header'} - set(arrays))}")
  header = json.loads(header)
  missing = {"model", "input_shape", "source_params", "layers"} - set(header)
  if missing:
    raise ValueError(f"the header lacks {sorted(missing)}")
  _check_layers(header, arrays)
  return Packed(header, arrays)


def load(path: str) -> Packed:
  """Reads the file at `path` and checks its structure; ValueError if it is not a valid
  one (`inference.load` also checks that the arrays fit the model)."""
  with open(path, "rb") as f:
    return from_bytes(f.read())
