"""Model summary of a binary network: precision, parameters, memory and MACs.

In the manner of `larq.models.summary`, for Flax models built from
`layers.BinaryConv` / `layers.BinaryDense`. `summarize(model, input_shape)`
traces `model.init` with `jax.eval_shape` (no arithmetic runs, no weights
are allocated) under `flax.linen.intercept_methods`, which records every
module call with its path, input and output shapes. Each binary layer's
quantizers are read from its fields and resolved with `quantizers.get`.

Per layer (one row per BinaryConv/BinaryDense/nn.Conv/nn.Dense, and one per
other module that owns parameters, e.g. BatchNorm, PReLU):

* input / kernel precision in bits: 1 if the resolved quantizer is binary
  (`q.is_binary`), else 32 (None = full precision);
* parameter counts by bit width: the kernel of a layer with a binary kernel
  quantizer is 1-bit; everything else (learned scales, biases, BatchNorm
  scale/bias, PReLU slopes, the noise adapters inside a binary layer, which
  are counted in that layer's row) is 32-bit;
* memory when deployed: 1 bit per binary weight, 4 bytes per float;
* multiply-accumulates per example, split by the precision of the operands:
  binary (both binary: xnor-popcount), mixed (one binary, one float) and
  float. A conv computes out_h * out_w * kh * kw * cin * cout (grouped convs:
  kernel size, i.e. cin per group), a dense layer cin * cout (times the
  positions of any leading non-batch axes). A layer called several times
  counts its MACs once per call, its parameters once.

Totals: parameters per bit width (their sum equals the size of the `params`
collection exactly), float32 size (all params as float32), deployed size,
compression ratio = float32 size / deployed size (>= 1), total MACs and the
share of binary MACs. Variables outside `params` (BatchNorm's `batch_stats`)
are reported as `non_trainable` and are not part of the sizes. MB = 2**20
bytes, kB = 2**10 bytes.

Command line: `fda-biper-jax-summary --model=resnet20` (`fda_biper_jax.cli.summary`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fda_biper_jax import trace

MB = 2 ** 20
KB = 2 ** 10
FLOAT_BITS = 32
BINARY_BITS = 1
IMAGENET_MODELS = ("resnet18", "resnet34")
CIFAR_SHAPE = (32, 32, 3)
IMAGENET_SHAPE = (224, 224, 3)

_FLOAT_MAC_LAYERS = (nn.Conv, nn.Dense)


@dataclasses.dataclass
class LayerRow:
  """One row of the summary: a MAC layer, or another module owning params."""
  name: str                       # module path, '/'-joined ('' parts dropped)
  type: str                       # module class name
  input_shape: tuple | None       # per example (batch axis dropped)
  output_shape: tuple | None      # per example
  kernel_shape: tuple | None
  input_quantizer: str | None     # resolved quantizer name, None = full precision
  kernel_quantizer: str | None
  input_bits: int | None          # 1 or 32; None for rows without MACs
  kernel_bits: int | None
  params_1bit: int = 0
  params_32bit: int = 0
  macs_binary: int = 0            # both operands binary (xnor-popcount)
  macs_mixed: int = 0             # one operand binary
  macs_float: int = 0             # neither binary
  calls: int = 1

  @property
  def params(self) -> int:
    return self.params_1bit + self.params_32bit

  @property
  def memory_bits(self) -> int:
    return BINARY_BITS * self.params_1bit + FLOAT_BITS * self.params_32bit

  @property
  def memory_bytes(self) -> float:
    """Deployed size in bytes: 1 bit per binary weight, 4 bytes per float."""
    return self.memory_bits / 8

  @property
  def macs(self) -> int:
    return self.macs_binary + self.macs_mixed + self.macs_float

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    for k in ("input_shape", "output_shape", "kernel_shape"):
      d[k] = None if d[k] is None else list(d[k])
    d.update(params=self.params, memory_bytes=self.memory_bytes, macs=self.macs)
    return d

  @classmethod
  def from_dict(cls, d) -> "LayerRow":
    kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
    for k in ("input_shape", "output_shape", "kernel_shape"):
      if kw.get(k) is not None:
        kw[k] = tuple(kw[k])
    return cls(**kw)


@dataclasses.dataclass
class Totals:
  params: int
  params_1bit: int
  params_32bit: int
  non_trainable: int              # variables outside `params` (batch_stats), not in sizes
  float32_bytes: int              # every parameter as float32
  float32_mb: float
  deployed_bytes: float           # 1 bit per binary weight, 4 bytes per float
  deployed_mb: float
  compression_ratio: float        # float32_bytes / deployed_bytes
  macs: int
  macs_binary: int
  macs_mixed: int
  macs_float: int
  binary_mac_share: float         # macs_binary / macs (0 when there are no MACs)

  @classmethod
  def from_rows(cls, rows: Sequence[LayerRow], non_trainable: int = 0) -> "Totals":
    p1 = sum(r.params_1bit for r in rows)
    p32 = sum(r.params_32bit for r in rows)
    fp_bytes = 4 * (p1 + p32)
    dep_bytes = (BINARY_BITS * p1 + FLOAT_BITS * p32) / 8
    mb, mm, mf = (sum(getattr(r, k) for r in rows)
                  for k in ("macs_binary", "macs_mixed", "macs_float"))
    macs = mb + mm + mf
    return cls(params=p1 + p32, params_1bit=p1, params_32bit=p32,
               non_trainable=non_trainable,
               float32_bytes=fp_bytes, float32_mb=fp_bytes / MB,
               deployed_bytes=dep_bytes, deployed_mb=dep_bytes / MB,
               compression_ratio=fp_bytes / dep_bytes if dep_bytes else 1.0,
               macs=macs, macs_binary=mb, macs_mixed=mm, macs_float=mf,
               binary_mac_share=mb / macs if macs else 0.0)


@dataclasses.dataclass
class Summary:
  model: str
  input_shape: tuple
  rows: list[LayerRow]
  totals: Totals

  def to_dict(self) -> dict[str, Any]:
    return {"model": self.model, "input_shape": list(self.input_shape),
            "rows": [r.to_dict() for r in self.rows],
            "totals": dataclasses.asdict(self.totals)}

  def to_json(self, **kwargs) -> str:
    return json.dumps(self.to_dict(), **kwargs)

  @classmethod
  def from_dict(cls, d) -> "Summary":
    return cls(model=d["model"], input_shape=tuple(d["input_shape"]),
               rows=[LayerRow.from_dict(r) for r in d["rows"]],
               totals=Totals(**d["totals"]))

  def __str__(self) -> str:
    return format_table(self)


# --------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------


def _shape(x) -> tuple | None:
  s = getattr(x, "shape", None)
  return None if s is None else tuple(int(d) for d in s)


def _per_example(s: tuple | None) -> tuple | None:
  return None if s is None or len(s) == 0 else tuple(s[1:])


def _bits(q) -> int:
  return BINARY_BITS if q is not None and q.is_binary else FLOAT_BITS


def _name(path: tuple, root: str) -> str:
  return "/".join(str(p) for p in path) if path else root


def summarize(model: nn.Module, input_shape: Sequence[int], *, dtype=jnp.float32,
              batch_size: int = 1, **apply_kwargs) -> Summary:
  """Summary of `model` on inputs of per-example shape `input_shape` (e.g. HWC).

  `apply_kwargs` go to the model's call (e.g. `train=True`);
  when the model takes a `train` argument and none is given, `train=False`
  (the deployed network) is used. Nothing is computed: `model.init` is only
  traced, under `jax.eval_shape`.
  """
  input_shape = tuple(int(d) for d in input_shape)
  if any(d <= 0 for d in input_shape):
    raise ValueError(f"summarize: input_shape={input_shape} must have positive dimensions")
  calls, variables = trace.calls(model, input_shape, dtype=dtype, batch_size=batch_size,
                                 **apply_kwargs)
  variables = dict(variables)
  params = variables.pop("params", {})
  non_trainable = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables))
  param_leaves = [(tuple(getattr(k, "key", getattr(k, "name", k)) for k in kp), int(np.prod(v.shape)),
                   _shape(v))
                  for kp, v in jax.tree_util.tree_leaves_with_path(params)]

  root = type(model).__name__
  rows: dict[tuple, LayerRow] = {}
  mac_paths: set[tuple] = set()
  kernel_shapes = {p[:-1]: s for p, _, s in param_leaves if p and p[-1] == "kernel"}

  # MAC layers, in call order.
  for c in calls:
    m = c.module
    settings = trace.settings(m)
    if settings is not None:
      qk, qi = settings.kernel_quantizer, settings.input_quantizer
    elif isinstance(m, _FLOAT_MAC_LAYERS):
      qk = qi = None
    else:
      continue
    kshape = kernel_shapes.get(c.parts)
    if kshape is None:
      continue
    out = _per_example(c.output_shape)
    positions = int(np.prod(out[:-1])) if out else 1
    n = positions * int(np.prod(kshape))
    ib, kb = _bits(qi), _bits(qk)
    row = rows.get(c.parts)
    if row is None:
      row = rows[c.parts] = LayerRow(
          name=_name(c.parts, root), type=type(m).__name__,
          input_shape=_per_example(c.input_shape), output_shape=out, kernel_shape=kshape,
          input_quantizer=None if qi is None else qi.name,
          kernel_quantizer=None if qk is None else qk.name,
          input_bits=ib, kernel_bits=kb, calls=0)
      mac_paths.add(c.parts)
    row.calls += 1
    nbin = (ib == BINARY_BITS) + (kb == BINARY_BITS)
    if nbin == 2:
      row.macs_binary += n
    elif nbin == 1:
      row.macs_mixed += n
    else:
      row.macs_float += n

  # Other modules that own parameters, in call order (first call).
  first_call = {}
  for c in calls:
    first_call.setdefault(c.parts, c)
  order = {p: i for i, p in enumerate(first_call)}

  def owner_row(owner: tuple) -> LayerRow:
    for k in range(len(owner), -1, -1):
      if owner[:k] in mac_paths:
        return rows[owner[:k]]
    if owner not in rows:
      c = first_call.get(owner)
      rows[owner] = LayerRow(
          name=_name(owner, root), type=type(c.module).__name__ if c else "params",
          input_shape=_per_example(c.input_shape) if c else None,
          output_shape=_per_example(c.output_shape) if c else None,
          kernel_shape=None, input_quantizer=None, kernel_quantizer=None,
          input_bits=None, kernel_bits=None, calls=sum(1 for d in calls if d.parts == owner))
    return rows[owner]

  for path, size, _ in param_leaves:
    owner = path[:-1]
    row = owner_row(owner)
    if path[-1] == "kernel" and owner in mac_paths and row.kernel_bits == BINARY_BITS:
      row.params_1bit += size
    else:
      row.params_32bit += size

  ordered = sorted(rows.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
  row_list = [r for _, r in ordered]
  totals = Totals.from_rows(row_list, non_trainable)
  n_params = sum(s for _, s, _ in param_leaves)
  assert totals.params == n_params, (totals.params, n_params)
  return Summary(model=root, input_shape=input_shape, rows=row_list, totals=totals)


# --------------------------------------------------------------------------
# Text table
# --------------------------------------------------------------------------


def _fmt_int(n) -> str:
  return f"{n:,}" if n else "0"


def _fmt_shape(s) -> str:
  return "-" if s is None else str(tuple(int(d) for d in s))


def format_table(summary: Summary) -> str:
  """A fixed-width text table of the rows, a total row, and the totals block."""
  header = ["Layer", "Type", "Output", "In bit", "W bit", "# 1-bit", "# 32-bit",
            "Mem (kB)", "1-bit MACs", "Mixed MACs", "32-bit MACs"]
  body = []
  for r in summary.rows:
    body.append([
        r.name, r.type, _fmt_shape(r.output_shape),
        "-" if r.input_bits is None else str(r.input_bits),
        "-" if r.kernel_bits is None else str(r.kernel_bits),
        _fmt_int(r.params_1bit), _fmt_int(r.params_32bit),
        f"{r.memory_bytes / KB:.2f}",
        _fmt_int(r.macs_binary), _fmt_int(r.macs_mixed), _fmt_int(r.macs_float)])
  t = summary.totals
  total = ["Total", "", "", "", "", _fmt_int(t.params_1bit), _fmt_int(t.params_32bit),
           f"{t.deployed_bytes / KB:.2f}", _fmt_int(t.macs_binary),
           _fmt_int(t.macs_mixed), _fmt_int(t.macs_float)]
  widths = [max(len(row[i]) for row in [header, *body, total]) for i in range(len(header))]

  def line(cells):
    return "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

  rule = "-" * len(line(header))
  title = f"{summary.model} stats (input {_fmt_shape(summary.input_shape)} per example; " \
          "MACs per example)"
  out = [title, rule, line(header), rule, *map(line, body), rule, line(total), rule]
  macs = max(t.macs, 1)
  block = [
      ("Total params", f"{t.params:,}"),
      ("  1-bit params", f"{t.params_1bit:,}"),
      ("  32-bit params", f"{t.params_32bit:,}"),
      ("Non-trainable variables (batch_stats, not in sizes)", f"{t.non_trainable:,}"),
      ("Float-32 size", f"{t.float32_mb:.2f} MB ({t.float32_bytes:,} bytes)"),
      ("Deployed size", f"{t.deployed_mb:.2f} MB ({t.deployed_bytes:,.0f} bytes)"),
      ("Compression ratio (float32 / deployed)", f"{t.compression_ratio:.2f}x"),
      ("Total MACs", f"{t.macs:,}"),
      ("  binary (xnor-popcount)", f"{t.macs_binary:,} ({t.macs_binary / macs:.2%})"),
      ("  mixed (one operand binary)", f"{t.macs_mixed:,} ({t.macs_mixed / macs:.2%})"),
      ("  float", f"{t.macs_float:,} ({t.macs_float / macs:.2%})"),
      ("Ratio of MACs that are binary", f"{t.binary_mac_share:.4f}"),
  ]
  kw = max(len(k) for k, _ in block)
  out += ["", f"{summary.model} summary", *(f"{k.ljust(kw)}  {v}" for k, v in block)]
  return "\n".join(out)


# --------------------------------------------------------------------------
# Input shapes
# --------------------------------------------------------------------------


def default_input_shape(name: str) -> tuple[int, int, int]:
  """224x224x3 for the ImageNet models (resnet18, resnet34), else 32x32x3."""
  return IMAGENET_SHAPE if name in IMAGENET_MODELS or "imagenet" in name else CIFAR_SHAPE
