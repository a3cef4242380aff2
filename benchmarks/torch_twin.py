"""A PyTorch twin of the library's ResNet-20 training step (imports torch).

The same network as `fda_biper_jax.models.resnet_cifar.ResNet20` built from
`models/blocks.py`, written the way the public BiPer PyTorch code writes it:

* stem: full-precision 3x3 conv 16 (padding 1, no bias) -> BatchNorm ->
  hardtanh;
* three stages of three blocks, widths 16, 32, 64, each block's first unit
  strided 1, 2, 2; a block is two Bi-Real units, each
  hardtanh(BN(conv3x3(x)) + shortcut(x)), the shortcut the identity or
  (option A) a 2x2 average pool and zero channels padded evenly on both
  sides; explicit symmetric padding k // 2 = 1;
* head: global average pool -> BatchNorm1d -> fc with bias.

Two settings:

* 'identity' (the float twin): the Bi-Real convs are plain float convs;
* 'biper' (BiPer stage 2, with the recipe's omega0 and tau): the kernel is
  the square wave sign(sin(omega0 W)) (sign(0) = +1) with gradient
  g omega0 cos(omega0 W); the input is divided per sample by
  sqrt(var + 1e-5) (variance over C, H, W) and binarized by sign with the
  ApproxSign gradient g max(2 - 2|x|, 0); the output is multiplied by a
  learned per-output-channel scale (initialised uniformly in [0, 1)); each
  binary layer adds tau mean(sin^2(omega0 W)) to the loss.

The step is softmax cross-entropy (mean over the batch) plus the
regularisers, backward, and SGD with momentum and coupled weight decay
(`torch.optim.SGD(weight_decay=...)`, which is optax's
`add_decayed_weights` before `sgd`), on a fixed float batch in NCHW
(PyTorch's default layout). It has no augmentation: the JAX step's crop,
flip and normalisation are timed with it (`benchmarks.train_step` reports
their share, about 1%).

Devices and dtypes: the step runs on `device` ('cpu' or 'cuda'); on CUDA
with `torch.backends.cudnn.benchmark` on (the usual setting for fixed
shapes: cuDNN picks each convolution's fastest algorithm at the first step,
as XLA's autotuner does at compile time). dtype 'bfloat16' is PyTorch's
mixed precision, `torch.autocast(dtype=torch.bfloat16)` around the forward
pass and the loss with float32 master weights, as the library's
`compute_dtype='bfloat16'`; 'float32' runs without autocast (on CUDA both
frameworks' defaults let cuDNN use TF32 for float32 convolutions).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

PRENORM_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch's convention: the weight of the new batch statistic
SETTINGS = ("identity", "biper")
DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # None: no autocast


def sign(x: torch.Tensor) -> torch.Tensor:
  """+1 where x >= 0, else -1 (sign(0) = +1), in x's dtype."""
  return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class SquareWave(torch.autograd.Function):
  """sign(sin(omega0 w)); backward g omega0 cos(omega0 w) (BiPer)."""

  @staticmethod
  def forward(ctx, w, omega0):
    ctx.save_for_backward(w)
    ctx.omega0 = omega0
    return sign(torch.sin(omega0 * w))

  @staticmethod
  def backward(ctx, g):
    (w,) = ctx.saved_tensors
    return g * (ctx.omega0 * torch.cos(ctx.omega0 * w)), None


class ApproxSign(torch.autograd.Function):
  """sign(x); backward g max(2 - 2|x|, 0) (Bi-Real Net)."""

  @staticmethod
  def forward(ctx, x):
    ctx.save_for_backward(x)
    return sign(x)

  @staticmethod
  def backward(ctx, g):
    (x,) = ctx.saved_tensors
    return g * torch.clamp(2.0 - 2.0 * x.abs(), min=0.0)


def prenormalize(x: torch.Tensor) -> torch.Tensor:
  """x / sqrt(var + 1e-5), the variance per sample over C, H, W."""
  var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
  return x / torch.sqrt(var + PRENORM_EPS)


class BinaryConv(nn.Module):
  """A 3x3 conv, padding 1, no bias; BiPer-quantized when `biper` is set."""

  def __init__(self, cin: int, cout: int, stride: int, biper: dict | None):
    super().__init__()
    self.stride, self.biper = stride, biper
    self.weight = nn.Parameter(torch.empty(cout, cin, 3, 3))
    nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
    if biper is not None:
      self.scale = nn.Parameter(torch.rand(cout))

  def forward(self, x: torch.Tensor, losses: list) -> torch.Tensor:
    if self.biper is None:
      return F.conv2d(x, self.weight, stride=self.stride, padding=1)
    omega0, tau = self.biper["omega0"], self.biper["tau"]
    xq = ApproxSign.apply(prenormalize(x))
    k = SquareWave.apply(self.weight, omega0)
    losses.append(tau * torch.square(torch.sin(omega0 * self.weight)).mean())
    y = F.conv2d(xq, k, stride=self.stride, padding=1)
    return y * self.scale.view(1, -1, 1, 1)


def option_a_shortcut(x: torch.Tensor, features: int, stride: int) -> torch.Tensor:
  """2x2 average pool when strided, then zero channels padded evenly on both sides."""
  if stride != 1:
    x = F.avg_pool2d(x, stride)
  extra = features - x.shape[1]
  if extra:
    x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
  return x


class BiRealUnit(nn.Module):
  """hardtanh(BN(conv(x)) + shortcut(x))."""

  def __init__(self, cin: int, cout: int, stride: int, biper: dict | None):
    super().__init__()
    self.features, self.stride = cout, stride
    self.conv = BinaryConv(cin, cout, stride, biper)
    self.bn = nn.BatchNorm2d(cout, eps=PRENORM_EPS, momentum=BN_MOMENTUM)

  def forward(self, x: torch.Tensor, losses: list) -> torch.Tensor:
    y = self.bn(self.conv(x, losses))
    return F.hardtanh(y + option_a_shortcut(x, self.features, self.stride))


class ResNet20(nn.Module):
  """The Bi-Real ResNet-20 of the BiPer code; `biper` None is the float twin."""

  def __init__(self, num_classes: int, biper: dict | None = None):
    super().__init__()
    self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(self.stem.weight, mode="fan_in", nonlinearity="relu")
    self.stem_bn = nn.BatchNorm2d(16, momentum=BN_MOMENTUM)
    units, cin = [], 16
    for width, first_stride in ((16, 1), (32, 2), (64, 2)):
      for b in range(3):
        for u in range(2):
          stride = first_stride if b == 0 and u == 0 else 1
          units.append(BiRealUnit(cin, width, stride, biper))
          cin = width
    self.units = nn.ModuleList(units)
    self.head_bn = nn.BatchNorm1d(64, momentum=BN_MOMENTUM)
    self.fc = nn.Linear(64, num_classes)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the sum of the binary layers' regularisers)."""
    losses: list = []
    x = F.hardtanh(self.stem_bn(self.stem(x)))
    for unit in self.units:
      x = unit(x, losses)
    logits = self.fc(self.head_bn(x.mean(dim=(2, 3))))
    return logits, (sum(losses) if losses else logits.new_zeros(()))


def biper_settings(quantization: dict) -> dict | None:
  """{'omega0', 'tau'} of a BiPer kernel quantizer config (None for the float twin);
  raises for any other quantization, which the twin does not implement."""
  kernel = quantization["kernel_quantizer"]
  name = kernel["name"] if isinstance(kernel, dict) else kernel
  if name == "identity":
    return None
  expected = {"input_quantizer": "approx_sign", "scaling": "learned", "prenorm": True}
  got = {k: quantization[k]["name"] if isinstance(quantization[k], dict) else quantization[k]
         for k in expected}
  if name != "biper" or got != expected:
    raise ValueError(f"the PyTorch twin implements the float twin and BiPer ({expected}), "
                     f"not kernel {name!r} with {got}")
  return {"omega0": float(kernel["omega0"]), "tau": float(kernel["tau"])}


class TrainStep:
  """One SGD step of the twin on a fixed batch: `__call__(i)` takes one step (queued on a
  GPU); `wait()` returns when the device has finished the steps taken.

  Args:
    quantization: the JAX config's `quantization` (see `biper_settings`).
    batch_size, image_size: the batch [batch_size, 3, image_size, image_size].
    learning_rate, momentum, weight_decay: SGD's.
    num_classes: width of the logits; labels are drawn uniformly.
    seed: of the weights and the batch.
    device: where the weights, the batch and the step live ('cpu', 'cuda', 'cuda:1').
    dtype: 'float32', or 'bfloat16' for mixed precision (see the module docstring).
  """

  def __init__(self, quantization: dict, *, batch_size: int, image_size: int,
               learning_rate: float, momentum: float, weight_decay: float,
               num_classes: int = 10, seed: int = 0, device: str = "cpu",
               dtype: str = "float32"):
    if dtype not in DTYPES:
      raise ValueError(f"dtype={dtype!r} is not allowed; allowed: {list(DTYPES)}")
    self.device = torch.device(device)
    if self.device.type == "cuda":
      torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    self.model = ResNet20(num_classes, biper_settings(quantization)).train().to(self.device)
    self.images = torch.randn(batch_size, 3, image_size, image_size).to(self.device)
    self.labels = torch.randint(0, num_classes, (batch_size,)).to(self.device)
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=learning_rate,
                                     momentum=momentum, weight_decay=weight_decay)
    self.autocast_dtype = DTYPES[dtype]

  def autocast(self):
    """The forward pass's mixed-precision context (none for float32)."""
    if self.autocast_dtype is None:
      return contextlib.nullcontext()
    return torch.autocast(self.device.type, dtype=self.autocast_dtype)

  def __call__(self, i: int = 0) -> None:
    self.optimizer.zero_grad(set_to_none=True)
    with self.autocast():
      logits, reg = self.model(self.images)
      loss = F.cross_entropy(logits, self.labels) + reg
    loss.backward()
    self.optimizer.step()

  def wait(self, _=None) -> None:
    """Blocks until the device has run every step taken (a no-op on the CPU)."""
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)
