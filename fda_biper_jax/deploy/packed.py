"""The bit-packed network file: a JSON header and named arrays, every byte checked.

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
from typing import Any, Mapping

import numpy as np
from flax import linen as nn
from flax import traverse_util

from fda_biper_jax import models

FORMAT = "fda_biper_jax.packed"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAGIC = b"FBJ-PACK"
PREAMBLE = struct.Struct("<8sQ32s")  # magic, header length, header SHA-256
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
  return PREAMBLE.pack(MAGIC, len(header), hashlib.sha256(header).digest()) + header + \
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


def from_bytes(data: bytes) -> Packed:
  """Parses and validates a file's bytes (module docstring); ValueError if bad."""
  view = memoryview(data)
  head = bytes(view[:len(MAGIC)])
  if head != MAGIC[:len(head)]:
    raise ValueError(f"not a {FORMAT} file: it starts with {head!r}, not the magic {MAGIC!r}")
  if len(data) < PREAMBLE.size:
    raise ValueError(f"the file is truncated: {len(data)} bytes, fewer than the "
                     f"{PREAMBLE.size}-byte preamble")
  _, length, digest = PREAMBLE.unpack_from(view)
  start = PREAMBLE.size + length
  if len(data) < start:
    raise ValueError(f"the file is truncated: {len(data)} bytes, its header ends at byte {start}")
  raw = view[PREAMBLE.size:start]
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
  return Packed(header, arrays)


def load(path: str) -> Packed:
  """Reads the file at `path` and checks its structure; ValueError if it is not a valid
  one (`inference.load` also checks that the arrays fit the model)."""
  with open(path, "rb") as f:
    return from_bytes(f.read())
