"""Reading IDX files (the MNIST file format) with a check of their decoded content.

An IDX file is a 4-byte magic number `0x00 0x00 <dtype> <ndim>`, `ndim` big-endian
uint32 dimensions, then the array in C order. Only unsigned bytes (dtype 0x08) are
used by the MNIST family. Files may be gzip-compressed; verification is done on
the DECODED bytes (header and data), so a recompressed copy of the same data
(as Debian ships it) passes while any change to the content fails.

numpy only: importing this module does not import tensorflow or tfds.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import zlib

import numpy as np

_UBYTE = 0x08


class IdxError(ValueError):
  """A manual-data IDX file is missing, unreadable or not the expected content."""


@dataclasses.dataclass(frozen=True)
class IdxSpec:
  """What one IDX file must decode to.

  name: file name without `.gz` (e.g. 'train-images-idx3-ubyte').
  shape: the array shape the header must declare.
  sha256: hex SHA-256 of the whole decoded file (header and data), or None to
    check only the header and size.
  """

  name: str
  shape: tuple[int, ...]
  sha256: str | None


def find(directory: str | os.PathLike, name: str) -> str | None:
  """Path of `name.gz` or `name` inside `directory`, or None when neither exists."""
  for candidate in (name + ".gz", name):
    path = os.path.join(os.fspath(directory), candidate)
    if os.path.isfile(path):
      return path
  return None


def decode_bytes(path: str | os.PathLike) -> bytes:
  """The decoded (decompressed when the name ends in .gz) content of an IDX file."""
  path = os.fspath(path)
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise IdxError(
        f"{path}: cannot be read as {'gzip' if path.endswith('.gz') else 'IDX'} "
        f"({type(e).__name__}: {' '.join(str(e).split())})"
    ) from e


def parse(raw: bytes, where: str = "IDX data") -> np.ndarray:
  """The uint8 array held by decoded IDX bytes (a read-only view of `raw`)."""
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise IdxError(f"{where}: not an IDX file (bad magic number)")
  if raw[2] != _UBYTE:
    raise IdxError(f"{where}: IDX element type 0x{raw[2]:02x}, expected 0x08 (unsigned byte)")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise IdxError(f"{where}: truncated IDX header")
  shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
  size = int(np.prod(shape, dtype=np.int64))
  if len(raw) != header + size:
    raise IdxError(
        f"{where}: header declares shape {shape} ({header + size} bytes) "
        f"but the decoded file has {len(raw)} bytes"
    )
  return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def sha256_hex(raw: bytes) -> str:
  return hashlib.sha256(raw).hexdigest()


def read_verified(path: str | os.PathLike, spec: IdxSpec) -> np.ndarray:
  """Decode, parse and verify one IDX file against `spec`; IdxError (one line) on any mismatch."""
  path = os.fspath(path)
  raw = decode_bytes(path)
  array = parse(raw, where=path)
  if array.shape != tuple(spec.shape):
    raise IdxError(f"{path}: shape {array.shape}, expected {tuple(spec.shape)}")
  if spec.sha256 is not None:
    digest = sha256_hex(raw)
    if digest != spec.sha256:
      raise IdxError(
          f"{path}: decoded content has sha256 {digest[:16]}..., expected "
          f"{spec.sha256[:16]}... (file corrupted, modified or not {spec.name})"
      )
  return array


def encode(array: np.ndarray) -> bytes:
  """IDX bytes of a uint8 array (for writing test fixtures)."""
  array = np.ascontiguousarray(array, dtype=np.uint8)
  header = bytes([0, 0, _UBYTE, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
  return header + array.tobytes()
