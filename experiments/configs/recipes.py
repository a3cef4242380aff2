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

ImageNet (methods notes): BiPer stage 1 200 epochs, SGD lr 0.1, batch 512, wd
1e-4; stage 2 100 epochs at lr 0.01 (no stage-2 weight decay is given: stage
1's is kept; tau, warm-up and omega0 are the CIFAR recipe's). FDA: Adam lr 1e-3,
wd 0 on ResNet-18 (the paper's Bi-Real + PReLU baseline; our resnet18 is the
Bi-Real layout without PReLU), no epoch count given: 100 epochs, batch 256,
cosine decay, here. Both stream imagenet2012 (tfds, manual download) at 224.
"""

from experiments.configs.base import get_base_config

BIPER_STAGES = {
    # stage: (kernel quantizer, epochs, lr, weight decay, tau)
    "stage1": ("biper_sine", 600, 0.021, 0.0016, 0.037),
    "stage2": ("biper", 300, 0.0037, 0.00016, 0.0468),
}


IMAGENET_BIPER_STAGES = {
    # stage: (epochs, lr, weight decay); quantizers and tau as BIPER_STAGES
    "stage1": (200, 0.1, 1e-4),
    "stage2": (100, 0.01, 1e-4),
}


def stage_workdir(model: str, stage: str) -> str:
  return f"runs/biper_{model}_{stage}"


def biper(model: str, stage: str, dataset: str = "cifar10"):
  if stage not in BIPER_STAGES:
    raise ValueError(f"stage={stage!r} is not allowed; allowed: {list(BIPER_STAGES)}")
  kernel, epochs, lr, wd, tau = BIPER_STAGES[stage]
  c = get_base_config()
  c.model, c.dataset = model, dataset
  c.quantization.kernel_quantizer = {"name": kernel, "omega0": 20.0}
  c.quantization.input_quantizer = {"name": "approx_sign"}
  c.quantization.scaling = "learned"
  c.quantization.prenorm = True
  c.num_epochs, c.batch_size = epochs, 256
  c.optimizer.learning_rate, c.optimizer.weight_decay = lr, wd
  c.optimizer.warmup_epochs = 5.0
  c.regularizer_tau = tau
  if stage == "stage2":
    c.init_from = stage_workdir(model, "stage1")
  return c


def imagenet(c):
  """A recipe moved to imagenet2012, streamed (fda_biper_jax/streaming.py) at 224."""
  c.dataset, c.input = "imagenet2012", "stream"
  c.stream.image_size, c.stream.eval_resize = 224, 256
  c.eval_every_epochs, c.log_every_steps, c.checkpoint_every_steps = 1, 100, 2000
  return c


def biper_imagenet(model: str, stage: str):
  c = imagenet(biper(model, stage))
  c.num_epochs, c.optimizer.learning_rate, c.optimizer.weight_decay = (
      IMAGENET_BIPER_STAGES[stage])
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
  fda_q = {"name": "fda", "omega": 0.1, "clip": 1.0}
  c.quantization.kernel_quantizer = dict(fda_q)
  c.quantization.input_quantizer = dict(fda_q)
  c.quantization.scaling = "mean_abs"
  c.quantization.kernel_noise = {"reduction": 64, "min_width": 4, "shortcut": "sin", "a": 0.1}
  c.quantization.input_noise = {"reduction": 64, "min_width": 4, "shortcut": "sin", "a": 0.1}
  c.num_epochs, c.batch_size = 400, 128
  c.optimizer.learning_rate, c.optimizer.weight_decay = 0.1, 1e-4
  c.fda.n_start, c.fda.n_end, c.fda.alpha_start = 9, 18, 0.1
  return c


def baseline(quantizer: str, model: str, dataset: str = "cifar10"):
  """sign with a straight-through estimator on weights and activations, mean|W|
  scaling; the FDA paper's SGD recipe (400 epochs at lr 0.1)."""
  c = get_base_config()
  c.model, c.dataset = model, dataset
  c.quantization.kernel_quantizer = {"name": quantizer}
  c.quantization.input_quantizer = {"name": quantizer}
  c.quantization.scaling = "mean_abs"
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


QUICK_QUANTIZERS = ("identity", "ste", "approx_sign", "sign_swish", "fda", "biper", "bnn_pp")


def quick(quantizer: str, dataset: str = "fashion_mnist"):
  """A few-minute CPU run of resnet20 (one epoch): each quantizer with its
  method's own settings (BiPer single stage, FDA with noise modules, BNN++
  annealed beta), Adam at 1e-3 with cosine decay."""
  if quantizer == "biper":
    c = biper("resnet20", "stage2", dataset)
    c.init_from = ""
  elif quantizer == "fda":
    c = fda("resnet20", dataset)
  elif quantizer == "identity":
    c = full_precision("resnet20", dataset)
  else:
    c = baseline(quantizer, "resnet20", dataset)
  if quantizer == "bnn_pp":
    c.bnn_pp.beta_start, c.bnn_pp.beta_end = 2.0, 200.0
  c.num_epochs, c.batch_size = 1, 128
  c.optimizer.name, c.optimizer.learning_rate = "adam", 1e-3
  c.optimizer.weight_decay, c.optimizer.warmup_epochs = 0.0, 0.0
  c.crop_pad, c.flip = 2, True
  c.log_every_steps, c.checkpoint_every_steps = 50, 200
  return c
