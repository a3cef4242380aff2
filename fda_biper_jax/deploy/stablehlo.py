"""The StableHLO artifact: a packed network's predictor as one self-contained file.

`export.stablehlo(network)` serializes the XNOR-popcount predictor of a
packed network (`inference.Predictor`: images -> logits) with `jax.export`,
its arrays baked in as constants; `load(path)` reads it back as a callable
that needs jax and numpy only: no Flax, no model code, nothing else of this
package is imported by this module.

The file is the `jax.export` serialization itself followed by a trailer:

    payload    Exported.serialize() (a flatbuffer holding the StableHLO
               module, its input and output shapes and its platforms)
    trailer    JSON, utf-8: {"format": "fda_biper_jax.stablehlo",
               "version": 1, "payload_bytes": len(payload),
               "sha256": SHA-256 of the payload (hex), "jax": the exporting
               jax's version, "model": the packed file's `models.config`
               (or null), "input_shape": [H, W, C]}
    length     the trailer's length in bytes, uint64 little-endian
    magic      MAGIC (8 bytes)

A flatbuffer is read from its first byte and ignores what follows it, so
`jax.export.deserialize(data)` reads the whole file as it is and jax alone
runs it. `from_bytes` checks the trailer first: a truncated, extended,
modified or foreign file is rejected with one ValueError line (jax's own
reader fails on such bytes with assorted errors, or not at all). The
checksum finds damage, not forgery: an artifact is a program, so load only
files you trust, as with any `jax.export` serialization.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from typing import Any, Mapping

import jax
import jax.numpy as jnp

FORMAT = "fda_biper_jax.stablehlo"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAGIC = b"FBJ-HLO\n"
PLATFORMS = ("cpu", "cuda", "tpu")  # the platforms an export lowers for by default
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's names
_TAIL = struct.calcsize("<Q") + len(MAGIC)


@dataclasses.dataclass(frozen=True)
class Artifact:
  """A deserialized predictor: `artifact(images)` -> float32 logits [N, classes].

  `exported` is the `jax.export.Exported`; `metadata` the trailer (module
  docstring). `images` are what the model takes (NHWC, normalised as in
  training), float32; the batch size is free when the export left it
  symbolic (`batch_size` None) and fixed otherwise.
  """
  exported: jax.export.Exported
  metadata: Mapping[str, Any]

  @property
  def input_shape(self) -> tuple[int | None, ...]:
    """The input's shape, None for a symbolic (free) dimension."""
    return tuple(d if isinstance(d, int) else None for d in self.exported.in_avals[0].shape)

  @property
  def platforms(self) -> tuple[str, ...]:
    return tuple(self.exported.platforms)

  def __call__(self, images) -> jax.Array:
    images = jnp.asarray(images, jnp.float32)
    check_shape(self.input_shape, images.shape)
    return self.exported.call(images)


def check_shape(expected: tuple[int | None, ...], shape: tuple[int, ...]) -> None:
  """ValueError unless `shape` fits `expected` (None: any size of at least 1)."""
  fits = len(shape) == len(expected) and all(
      d == e if e is not None else d >= 1 for d, e in zip(shape, expected))
  if not fits:
    want = ", ".join("N" if e is None else str(e) for e in expected)
    raise ValueError(f"images of shape {tuple(shape)} do not fit the artifact, which takes "
                     f"({want})")


# --------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------


def to_bytes(artifact: Artifact) -> bytes:
  """The file's bytes (module docstring); the trailer's checksum fields are recomputed."""
  payload = bytes(artifact.exported.serialize())
  trailer = dict(artifact.metadata, format=FORMAT, version=VERSION,
                 payload_bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
  text = json.dumps(trailer, sort_keys=True).encode("utf-8")
  return payload + text + struct.pack("<Q", len(text)) + MAGIC


def save(artifact: Artifact, path: str) -> None:
  """Writes `artifact` to `path` (atomically: a temporary file, then a rename)."""
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(to_bytes(artifact))
  os.replace(tmp, path)


def _trailer(data: bytes) -> tuple[bytes, dict[str, Any]]:
  """(payload, trailer) of a file's bytes, the trailer's structure checked."""
  if len(data) < _TAIL or data[-len(MAGIC):] != MAGIC:
    raise ValueError(f"not a {FORMAT} artifact, or not a complete one ({len(data)} bytes): it "
                     "does not end with the artifact's marker")
  (length,) = struct.unpack("<Q", data[-_TAIL:-len(MAGIC)])
  if length > len(data) - _TAIL:
    raise ValueError(f"the artifact is truncated: {len(data)} bytes, its trailer alone claims "
                     f"{length}")
  try:
    trailer = json.loads(data[-_TAIL - length:-_TAIL].decode("utf-8"))
    declared = int(trailer["payload_bytes"])
  except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"the artifact's trailer is not valid ({type(e).__name__}): the file "
                     "was modified or corrupted") from None
  if trailer.get("format") != FORMAT:
    raise ValueError(f"format={trailer.get('format')!r} is not supported; a {FORMAT!r} "
                     "artifact is required")
  if trailer.get("version") not in SUPPORTED_VERSIONS:
    raise ValueError(f"artifact version {trailer.get('version')!r} is not supported; "
                     f"supported: {list(SUPPORTED_VERSIONS)}")
  payload = data[:-_TAIL - length]
  if len(payload) != declared:
    raise ValueError(f"the artifact is {'truncated' if len(payload) < declared else 'too long'}"
                     f": its payload is {len(payload)} bytes, its trailer declares {declared}")
  return payload, trailer


def from_bytes(data: bytes) -> Artifact:
  """Checks and deserializes a file's bytes (module docstring); ValueError if bad."""
  payload, trailer = _trailer(bytes(data))
  if hashlib.sha256(payload).hexdigest() != trailer.get("sha256"):
    raise ValueError("the artifact fails its SHA-256 checksum: the file was modified or "
                     "corrupted")
  try:
    exported = jax.export.deserialize(bytearray(payload))
  except Exception as e:  # noqa: BLE001 -- jax's reader raises assorted errors
    first = (str(e).splitlines() or [""])[0][:300]
    raise ValueError(f"jax {jax.__version__} cannot read this artifact (exported with jax "
                     f"{trailer.get('jax')}): {type(e).__name__}: {first}") from None
  return Artifact(exported, trailer)


def load(path: str) -> Artifact:
  """Reads and checks the artifact at `path`: a callable images -> logits (`Artifact`)."""
  with open(path, "rb") as f:
    return from_bytes(f.read())

