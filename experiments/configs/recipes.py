"""The papers' recipes as functions; the config files beside this one call them.

BiPer (Vargas et al., CVPR 2024; public code edmav4/BiPer, CIFAR-10 ResNet-18
scripts): two stages. Stage 1 trains the real periodic weights sin(w0 W)
(`biper_sine`) with binary activations (sign with ApproxSign backward after
per-sample std normalisation, as ReCU); stage 2 binarizes the weights too
(`biper`, the square wave) starting from stage 1's best weights with a fresh
optimizer. omega0 = 20, learned per-channel scale, sin^2 regulariser tau.
The reference scripts' hyper-parameters are those of ResNet-18; they are used
for ResNet-20 and VGG-Small too.

FDA (Xu et al., NeurIPS 2021): sign forward, Fourier-series backward on weights
and activations (omega = 0.1, gradient zeroed outside |x| <= 1, as the BiBench
port), n growing 9 -> 18, noise adaptation modules whose weight alpha decays to
0, mean|W| weight scaling; SGD lr 0.1, momentum 0.9, wd 1e-4, batch 128, 400
epochs, cosine decay.

ImageNet, as the public BiPer ImageNet code (which differs from its CIFAR
code): stage 1 200 epochs, SGD lr 0.1, batch 512; stage 2 100 epochs at lr
0.01 with no warm-up; no sin^2 regulariser (it is commented out there);
weight decay 1e-4 in both stages only on parameters named conv / fc (the
binary and stem conv kernels, their learned scale alpha, the fc), not on
BatchNorm nor the full-precision downsample conv
(`optimizer.weight_decay_mask`); every BatchNorm scale starts at 1e-8
(`bn_scale_init`). Each is a config field, so `--config.` overrides any of
them. FDA: Adam lr 1e-3,
wd 0 on ResNet-18 (the paper's Bi-Real + PReLU baseline; our resnet18 is the
Bi-Real layout without PReLU), no epoch count given: 100 epochs, batch 256,
cosine decay, here. Both stream imagenet2012 (tfds, manual download) at 224.
"""

from fda_biper_jax.train.config import default as get_base_config
from fda_biper_jax import methods

OMEGA0 = 20.0
BIPER_STAGES = {
    # stage: (kernel quantizer, epochs, lr, weight decay, tau)
    "stage1": ("biper_sine", 600, 0.021, 0.0016, 0.037),
    "stage2": ("biper", 300, 0.0037, 0.00016, 0.0468),
}

IMAGENET_BIPER_STAGES = {
    # stage: (epochs, lr, weight decay, warm-up epochs)
    "stage1": (200, 0.1, 1e-4, 5.0),
    "stage2": (100, 0.01, 1e-4, 0.0),
}
# The public BiPer ImageNet code decays parameters whose names contain conv or fc,
# which excludes its BatchNorms and the full-precision downsample conv.
IMAGENET_DECAY_MASK = "re:^(?!.*downsample/).*(conv|fc)/"
IMAGENET_BN_SCALE_INIT = 1e-8

FDA_QUANTIZER = {
    "name": "fda", "omega": 0.1, "clip": 1.0,
    "n_terms": {"schedule": "stepwise", "start": 9, "end": 18},
    "noise": {"reduction": 64, "min_width": 4, "shortcut": "sin", "a": 0.1},
    "alpha": {"schedule": "cosine", "start": 0.1, "end": 0.0},
}


def stage_workdir(model: str, stage: str) -> str:
  return f"runs/biper_{model}_{stage}"


def usage(name: str, variant: str = "") -> dict:
  """A registered method's own quantization settings (`Method.usage`, or a named
  `Method.variants` entry), as a plain dict."""
  method = methods.lookup(name)
  if variant:
    if variant not in method.variants:
      raise ValueError(f"variant={variant!r} of {name!r} is not allowed; allowed: "
                       f"{list(method.variants) or 'none'}")
    u = method.variants[variant]
  else:
    u = method.usage
  if u is None:
    raise ValueError(f"method {name!r} declares no usage; set Method.usage to train it by name")
  return {k: (dict(v) if isinstance(v, dict) else v) for k, v in u.items()}


def biper(model: str, stage: str, dataset: str = "cifar10"):
  if stage not in BIPER_STAGES:
    raise ValueError(f"stage={stage!r} is not allowed; allowed: {list(BIPER_STAGES)}")
  kernel, epochs, lr, wd, tau = BIPER_STAGES[stage]
  c = get_base_config()
  c.model, c.dataset = model, dataset
  c.quantization.kernel_quantizer = {"name": kernel, "omega0": OMEGA0, "tau": tau}
  c.quantization.input_quantizer = {"name": "approx_sign"}
  c.quantization.scaling = "learned"
  c.quantization.prenorm = True
  c.num_epochs, c.batch_size = epochs, 256
  c.optimizer.learning_rate, c.optimizer.weight_decay = lr, wd
  c.optimizer.warmup_epochs = 5.0
  if stage == "stage2":
    c.init_from = stage_workdir(model, "stage1")
  return c


def imagenet(c):
  """A recipe moved to imagenet2012, streamed (fda_biper_jax/data/streaming.py) at 224."""
  c.dataset, c.input = "imagenet2012", "stream"
  c.stream.image_size, c.stream.eval_resize = 224, 256
  c.eval_every_epochs, c.log_every_steps, c.checkpoint_every_steps = 1, 100, 2000
  return c


def biper_imagenet(model: str, stage: str):
  c = imagenet(biper(model, stage))
  (c.num_epochs, c.optimizer.learning_rate, c.optimizer.weight_decay,
   c.optimizer.warmup_epochs) = IMAGENET_BIPER_STAGES[stage]
  c.quantization.kernel_quantizer.tau = 0.0
  c.optimizer.weight_decay_mask = IMAGENET_DECAY_MASK
  c.bn_scale_init = IMAGENET_BN_SCALE_INIT
  c.batch_size = 512
  return c


def fda_imagenet(model: str):
  c = imagenet(fda(model))
  c.num_epochs, c.batch_size = 100, 256
  c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay = "adam", 1e-3, 0.0
  return c


def fda(model: str, dataset: str = "cifar10"):
  c = get_base_config()
  c.model, c.dataset = model, dataset
  c.quantization.kernel_quantizer = dict(FDA_QUANTIZER)
  c.quantization.input_quantizer = dict(FDA_QUANTIZER)
  c.quantization.scaling = "mean_abs"
  c.num_epochs, c.batch_size = 400, 128
  c.optimizer.learning_rate, c.optimizer.weight_decay = 0.1, 1e-4
  return c


def baseline(quantizer: str, model: str, dataset: str = "cifar10", variant: str = ""):
  """A registered method with its own quantization settings (`usage`) on any
  model, with the FDA paper's SGD recipe (400 epochs at lr 0.1, batch 128)."""
  c = get_base_config()
  c.model, c.dataset = model, dataset
  c.quantization = usage(quantizer, variant)
  c.num_epochs, c.batch_size = 400, 128
  return c


def full_precision(model: str, dataset: str = "cifar10"):
  """The same model with the identity quantizer everywhere."""
  c = get_base_config()
  c.model, c.dataset = model, dataset
  c.num_epochs, c.batch_size = 200, 128
  return c


def parse(arg: str, allowed: dict[str, tuple], default: str) -> list[str]:
  """Splits 'a,b' config arguments, with a clear error for a wrong count."""
  parts = (arg or default).split(",")
  if len(parts) != len(allowed):
    raise ValueError(f"config argument {arg!r} is not allowed; expected "
                     f"{','.join(allowed)} with {' / '.join(f'{k} in {v}' for k, v in allowed.items())}")
  for (k, v), p in zip(allowed.items(), parts):
    if p not in v:
      raise ValueError(f"config argument {k}={p!r} is not allowed; allowed: {list(v)}")
  return parts


def quick_methods() -> tuple[str, ...]:
  """Every registered method with a usage: what `quick` and the sweep train."""
  return tuple(n for n in methods.names() if methods.lookup(n).usage is not None)


def quick(quantizer: str, dataset: str = "fashion_mnist", variant: str = ""):
  """A few-minute CPU run of resnet20 (one epoch): each method with its own
  quantization settings (`Method.usage`: BiPer single stage with prenorm and
  learned scale, FDA with noise modules, BNN++ annealed beta, ...), Adam at
  1e-3 with cosine decay."""
  c = full_precision("resnet20", dataset)
  c.quantization = usage(quantizer, variant)
  c.num_epochs, c.batch_size = 1, 128
  c.optimizer.name, c.optimizer.learning_rate = "adam", 1e-3
  c.optimizer.weight_decay, c.optimizer.warmup_epochs = 0.0, 0.0
  c.crop_pad, c.flip = 2, True
  c.log_every_steps, c.checkpoint_every_steps = 50, 200
  return c
