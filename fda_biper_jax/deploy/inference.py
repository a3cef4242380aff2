"""Inference on packed binary operands: XNOR-popcount convolutions and dense layers.

The deployed forward of a network exported by `fda_biper_jax.deploy.export`, in the
manner of XNOR-Net (Rastegari et al., ECCV 2016) and of the BNN inference
engines (daBNN, Larq Compute Engine): the +-1 kernel and the +-1 input of a
binary layer are stored 32 to a uint32 and their dot products computed with
xor and popcount.

Bit encoding (the file format's): a +-1 value v is the bit v < 0, so +1 -> 0
and -1 -> 1. `pack_bits` packs an axis 32 entries per uint32, entry 32 i + j in
bit j of word i (least significant bit first), the tail of the last word
filled with 0 bits. For +-1 vectors a, w of length K,

    <a, w> = K - 2 popcount(a xor w),

xor marking the K positions where they differ; tail bits are 0 in both
operands, so they add no mismatch.

Convolutions (`binary_conv`): the file packs a conv kernel along K = kh kw Cin
(an HWIO kernel flattened to [K, Cout]). At run time each pixel's Cin signs
are packed first and the patches cut from the words (im2col on 32 times
less data than the floats); with Cin a multiple of 32 these are exactly the
file's words, otherwise the kernel is re-laid out so that each tap starts a
word (`_per_tap`, a few bit operations on the kernel per call). A conv
zero-pads its input and 0 is not +-1: in the patches a padded tap holds
bits 0, i.e. +1s, so the xor counts a mismatch there exactly where the
kernel bit is 1. The exact dot product over the taps inside the image is
therefore

    K_valid(p) - 2 (popcount(a xor w) - n_w(p)),

with K_valid(p) the number of entries of output position p's patch inside
the image and n_w(p) the number of -1s of the kernel on its padded taps:
the [Ho, Wo, taps] mask of padded taps times the kernel's [taps, Cout]
counts of -1s, a small integer product without a batch axis, computed only
when the conv pads.

A layer with a binary kernel and a float (or non-binary) input, "mixed",
unpacks its kernel to +-1 floats and convolves in float: also exact.

`Predictor` runs a whole exported network. Its graph is the Flax model
definition itself: the model of the file's `models.config` is applied under
`flax.linen.intercept_methods`, which replaces the call of every packed
`BinaryConv` / `BinaryDense` with the packed computation above (then the
per-channel scale and bias, BatchNorm folded in) and the call of every
folded BatchNorm with the identity. Everything else (the float stem, 1x1
downsample convs, unfolded BatchNorms, activations, pools, shortcuts, the
head) runs the model's own code on the exported float variables. No
architecture is written twice, and every model of the zoo deploys as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from fda_biper_jax.deploy import packed as packed_lib
from fda_biper_jax.deploy.packed import WORD_BITS, Packed, num_words
from fda_biper_jax.nn.linen import BinaryConv, BinaryDense, BinaryLayer, deployed_input


Array = jax.Array
BLOCK = 64  # output channels per step of the popcount loop
GROUP = 32  # words per step of the popcount loop
Padding = tuple[tuple[int, int], tuple[int, int]]


# --------------------------------------------------------------------------
# Bits
# --------------------------------------------------------------------------


def pack_bits(bits, axis: int = -1):
  """Packs booleans 32 per uint32 along `axis`: entry 32 i + j is bit j of word i.

  The last word's unused high bits are 0. The axis shrinks to ceil(K / 32).
  A numpy input is packed with numpy (export packs on the host, compiling
  nothing), anything else with jax.numpy.
  """
  xp = np if isinstance(bits, np.ndarray) else jnp
  bits = xp.moveaxis(xp.asarray(bits, xp.bool_), axis, -1)
  k = bits.shape[-1]
  n = num_words(k)
  bits = xp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, n * WORD_BITS - k)])
  bits = bits.reshape(*bits.shape[:-1], n, WORD_BITS).astype(xp.uint32)
  words = xp.sum(bits << xp.arange(WORD_BITS, dtype=xp.uint32), axis=-1, dtype=xp.uint32)
  return xp.moveaxis(words, -1, axis)


def unpack_bits(words, length: int, axis: int = -1) -> Array:
  """The inverse of `pack_bits`: the first `length` bits of `axis`, as booleans."""
  words = jnp.moveaxis(jnp.asarray(words), axis, -1)
  if words.dtype != jnp.uint32:
    raise ValueError(f"unpack_bits: words have dtype {words.dtype}; uint32 is required")
  if length < 1 or words.shape[-1] != num_words(length):
    raise ValueError(f"unpack_bits: length={length} does not fit {words.shape[-1]} words; "
                     f"it must be in [{WORD_BITS * words.shape[-1] - WORD_BITS + 1}, "
                     f"{WORD_BITS * words.shape[-1]}]")
  bits = (words[..., None] >> jnp.arange(WORD_BITS, dtype=jnp.uint32)) & 1
  bits = bits.reshape(*words.shape[:-1], -1)[..., :length].astype(jnp.bool_)
  return jnp.moveaxis(bits, -1, axis)


def _mismatches(a: Array, w: Array) -> Array:
  """sum_k popcount(a[..., k] xor w[o, k]): int32 [..., Cout] of a [..., Kw], w [Cout, Kw].

  A loop over blocks of at most `BLOCK` output channels and `GROUP` words;
  a step sums one elementwise term per word, which XLA fuses into one loop
  vectorised over the block's channels (a reduce over the word axis ran up
  to 15 times slower on CPU; unrolling every word of a wide layer compiles
  slowly). The loop is also there for XLA's fusion: it duplicates
  elementwise producers into each consumer, so a layer's popcount sums would
  be recomputed inside every user of its output (the next layer's packing,
  the residual shortcut: over and over along a ResNet stage), while a loop
  is never fused, so its result is computed once. XLA inlines one-step
  loops, hence at least two blocks.
  """
  cout, words = w.shape
  blocks = 1 if cout == 1 else max(2, -(-cout // BLOCK))
  groups = -(-words // GROUP)
  size, width = -(-cout // blocks), -(-words // groups)
  # Zero words in both operands add no mismatch; extra channels are cut off.
  w = jnp.pad(w, ((0, blocks * size - cout), (0, groups * width - words)))
  a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, groups * width - words)])

  def step(i, out):
    block, group = i // groups, i % groups
    ag = lax.dynamic_slice_in_dim(a, group * width, width, axis=-1)
    wg = lax.dynamic_slice(w, (block * size, group * width), (size, width))
    total = lax.dynamic_slice_in_dim(out, block * size, size, axis=-1)
    for k in range(width):
      total = total + lax.population_count(ag[..., k, None] ^ wg[:, k]).astype(jnp.int32)
    return lax.dynamic_update_slice_in_dim(out, total, block * size, axis=-1)

  out = jnp.zeros((*a.shape[:-1], blocks * size), jnp.int32)
  return lax.fori_loop(0, blocks * groups, step, out)[..., :cout]


def xnor_dot(a: Array, w: Array, length: int) -> Array:
  """<a, w> = length - 2 popcount(a xor w) of packed +-1 operands: int32 [..., Cout].

  a: packed [..., Kw]; w: packed [Cout, Kw]; length: the true K.
  """
  return length - 2 * _mismatches(a, w)


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------


def im2col(x: Array, kernel_size: Sequence[int], strides: Sequence[int],
           padding: Padding) -> Array:
  """Patches [N, Ho, Wo, kh kw C] of x [N, H, W, C] in (kh, kw, C) order, zero padded."""
  (kh, kw), (sh, sw) = kernel_size, strides
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  taps = [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
          for i in range(kh) for j in range(kw)]
  return jnp.concatenate(taps, axis=-1)


def _outside_taps(in_hw: Sequence[int], kernel_size: Sequence[int], strides: Sequence[int],
                  padding: Padding) -> np.ndarray:
  """bool [Ho, Wo, kh kw]: which taps of each output position fall in the padding."""
  inside = []
  for n, k, s, (lo, hi) in zip(in_hw, kernel_size, strides, padding):
    out = (n + lo + hi - k) // s + 1
    pos = np.arange(out)[:, None] * s + np.arange(k)[None, :] - lo
    inside.append((pos >= 0) & (pos < n))
  rows, cols = inside
  outside = ~(rows[:, None, :, None] & cols[None, :, None, :])  # [Ho, Wo, kh, kw]
  return outside.reshape(*outside.shape[:2], -1)


def _per_tap(kernel: Array, taps: int, channels: int) -> Array:
  """A packed [Cout, ceil(taps C / 32)] kernel as [Cout, taps, ceil(C / 32)].

  Each tap's C bits start a word, as in `binary_conv`'s patches; the words
  are the same when C is a multiple of 32.
  """
  cout = kernel.shape[0]
  if channels % WORD_BITS == 0:
    return kernel.reshape(cout, taps, -1)
  bits = unpack_bits(kernel, taps * channels).reshape(cout, taps, channels)
  return pack_bits(bits)


def binary_conv(bits: Array, kernel: Array, kernel_size: Sequence[int],
                strides: Sequence[int], padding: Padding) -> Array:
  """Exact conv of +-1 inputs (bits [N, H, W, C]) with a packed kernel [Cout, Kw].

  The kernel is packed along K = kh kw C (the file's layout); padding is
  explicit ((top, bottom), (left, right)) zero padding, which contributes 0
  as in a float conv (see the module docstring for both). Returns the
  integer dot products, int32 [N, Ho, Wo, Cout].
  """
  c = bits.shape[-1]
  taps = int(np.prod(kernel_size))
  k = taps * c
  if kernel.shape[-1] != num_words(k):
    raise ValueError(f"binary_conv: kernel has {kernel.shape[-1]} words per channel; "
                     f"K = {k} needs {num_words(k)}")
  kernel = _per_tap(kernel, taps, c)
  patches = im2col(pack_bits(bits), kernel_size, strides, padding)
  mismatches = _mismatches(patches, kernel.reshape(kernel.shape[0], -1))
  outside = _outside_taps(bits.shape[1:3], kernel_size, strides, padding)
  if not outside.any():
    return k - 2 * mismatches
  minus_ones = jnp.sum(lax.population_count(kernel), axis=-1, dtype=jnp.int32)  # [Cout, taps]
  correction = jnp.einsum("hwt,ot->hwo", outside.astype(np.int32), minus_ones)
  k_valid = (k - c * outside.sum(axis=-1, keepdims=True)).astype(np.int32)
  return k_valid - 2 * (mismatches - correction)


def binary_dense(bits: Array, kernel: Array) -> Array:
  """Exact dot products of +-1 inputs (bits [..., K]) with a packed kernel [Cout, Kw]."""
  k = bits.shape[-1]
  if kernel.shape[-1] != num_words(k):
    raise ValueError(f"binary_dense: kernel has {kernel.shape[-1]} words per channel; "
                     f"K = {k} needs {num_words(k)}")
  return xnor_dot(pack_bits(bits), kernel, k)


def _explicit(geometry, in_hw: Sequence[int]) -> Padding:
  """The explicit ((top, bottom), (left, right)) zero padding of a 2-D conv."""
  if isinstance(geometry.padding, str):
    return tuple(lax.padtype_to_pads(tuple(in_hw), geometry.kernel_size, geometry.strides,
                                     geometry.padding))
  return tuple(tuple(p) for p in geometry.padding)


def _popcount_conv(geometry) -> bool:
  """Whether the xor-popcount conv computes this geometry: 2-D, undilated, ungrouped,
  zero padded (the others unpack the kernel to +-1 floats: also exact)."""
  return (geometry.rank == 2 and geometry.input_dilation == (1, 1)
          and geometry.kernel_dilation == (1, 1) and geometry.groups == 1)


def packed_layer(module: BinaryConv | BinaryDense, x: Array, operands: Mapping[str, Array],
                 layer: Mapping[str, Any], path: str) -> Array:
  """The eval-mode output of `module` on x, from its packed kernel.

  operands: 'kernel' (packed uint32 [Cout, Kw]), 'scale', 'bias' (float32
  [Cout]), 'input_aux' (the input quantizer's learned arrays, or None);
  layer: its header entry. A binary input quantizer takes the
  xor-popcount path where it applies, any other input (or conv geometry) the
  +-1 kernel in float.
  """
  s = module.settings()
  conv = isinstance(module, BinaryConv)
  dtype = module.dtype or x.dtype
  g = None
  if conv:
    g = module.geometry(x.shape)
    x = g.flatten(x)
  x = x.astype(dtype)
  shape = (g.kernel_shape(x.shape[-1], module.features) if conv
           else (x.shape[-1], module.features))
  if tuple(layer["kernel_shape"]) != shape:
    raise ValueError(f"layer {path}: the exported kernel shape {tuple(layer['kernel_shape'])} "
                     f"does not fit the model, which needs {shape}")
  qi = s.input_quantizer
  kernel = operands["kernel"]
  xq = x if qi is None else deployed_input(qi, x, operands.get("input_aux"), s.prenorm)
  if conv:
    xq, padding = g.pad(xq)
    g = dataclasses.replace(g, padding=padding)
  if s.binary_input and (not conv or _popcount_conv(g)):
    bits = xq < 0
    dot = (binary_conv(bits, kernel, g.kernel_size, g.strides, _explicit(g, xq.shape[1:3]))
           if conv else binary_dense(bits, kernel))
  else:
    k = int(np.prod(shape[:-1]))
    w = (1 - 2 * unpack_bits(kernel, k).astype(dtype)).T.reshape(shape)
    dot = g.conv(lax.conv_general_dilated, xq, w) if conv else jnp.dot(xq, w)
  y = (dot.astype(jnp.float32) * operands["scale"] + operands["bias"]).astype(dtype)
  return g.unflatten(y) if conv else y


# --------------------------------------------------------------------------
# Whole networks
# --------------------------------------------------------------------------


def _first_arg(args, kwargs):
  return args[0] if args else next(iter(kwargs.values()))


class Predictor:
  """The logits of an exported network, jit-compiled: `Predictor(packed)(images)`.

  Images are what the model takes (NHWC float, normalised as in training);
  the model is called with `train=False` when it takes `train`.
  `apply(operands, images)` is the pure jitted function of the arrays in
  `operands` (place them on another device with `jax.device_put`). The
  float layers compute in the model's dtype: with bfloat16 the logits match
  the model's only up to bfloat16 rounding, which the binarizations can
  amplify, as they do between the model's own bfloat16 and float32 runs.
  """

  def __init__(self, packed: Packed, model=None):
    """`model`: the network's Flax model; rebuilt from the file's configuration when
    None (a zoo or factory model; any other must be given)."""
    self.model = packed.model() if model is None else model
    self.layers = packed.header["layers"]
    self.folded = frozenset(e["folded_bn"] for e in self.layers.values() if e["folded_bn"])
    self.operands = jax.tree.map(jnp.asarray, {"variables": packed.float_variables(),
                                               "layers": packed.layer_arrays()})
    self.apply = jax.jit(self._logits)

  def __call__(self, images) -> Array:
    return self.apply(self.operands, images)

  def _logits(self, operands, images, visited: set | None = None) -> Array:
    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name == "__call__":
        path = "/".join(module.path)
        packed = path in self.layers and isinstance(module, BinaryLayer)
        folded = path in self.folded and isinstance(module, nn.BatchNorm)
        if visited is not None and (packed or folded):
          visited.add(path)
        if folded:
          return _first_arg(args, kwargs)
        if packed:
          return packed_layer(context.module, _first_arg(args, kwargs),
                              operands["layers"][path], self.layers[path], path)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      return self.model.apply(operands["variables"], images, train=False)

  def check(self, input_shape: Sequence[int]) -> jax.ShapeDtypeStruct:
    """Traces the network (nothing runs) on one input of `input_shape`.

    Raises:
      ValueError: the arrays do not fit the model (a shape, a missing
        variable), or a packed layer or folded BatchNorm is not in it.
    """
    visited: set = set()
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    name = self.model.__class__.__name__
    try:
      out = jax.eval_shape(lambda o, x: self._logits(o, x, visited), self.operands, x)
    except ValueError:
      raise
    except Exception as e:  # noqa: BLE001 -- flax's scope errors are not ValueErrors
      raise ValueError(f"the exported arrays do not fit {name}: "
                       f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    missing = (set(self.layers) | self.folded) - visited
    if missing:
      raise ValueError(f"the exported layers {sorted(missing)} are not in {name}")
    return out


def load(path: str) -> Packed:
  """Reads a packed file and checks it whole: its structure (`packed.load`) and that
  its arrays fit its model (`Predictor.check`); one ValueError otherwise."""
  packed = packed_lib.load(path)
  Predictor(packed).check(packed.header["input_shape"])
  return packed
