"""Short-budget recipes on a 2-core CPU: BiPer resnet20 (both stages) and its float twin.

  python -m experiments.time_to_accuracy --recipe=biper --target=0.85 --workdir=runs/fast_biper
  python -m experiments.cifar --config=experiments/configs/fast.py:biper_stage1 \
      --workdir=runs/fast_biper/biper_stage1

Fashion-MNIST, resnet20, batch 128, crop (pad 2) + flip; SGD with Nesterov
momentum and a one-cycle learning rate in each stage. BiPer as in its paper
(stage 1: the sine weights sin(w0 W) with binary activations; stage 2: the
square wave, from stage 1's best weights with a fresh optimizer; omega0 = 20,
learned per-channel scale, prenorm, approx_sign activations), 2 + 1 epochs:
what fits 10 minutes of a 2-core CPU (about 2.8 minutes an epoch); the float
twin 3 epochs. Measured: 85.34% at 9.8 minutes for BiPer, 90.53% for the twin
(docs/results.md, benchmarks/NOTES.md). The optimizer, learning rates and
schedule are among the best points of the measured search in fast_search.py
(docs/results.md: SGD beats Adam by 9 and 5 points; the learning rates next
to these are within a single seed's noise). The
papers' recipes are untouched beside this file (biper_resnet20.py, recipes.py).
"""

from experiments.configs import recipes

STAGES = {"biper": ("biper_stage1", "biper_stage2"), "identity": ("identity",)}
# stage: (kernel quantizer, epochs, peak learning rate, weight decay)
BIPER = {"biper_stage1": ("biper_sine", 2, 0.1, 1e-4),
         "biper_stage2": ("biper", 1, 0.02, 0.0)}
IDENTITY_EPOCHS, IDENTITY_LR = 3, 0.1


def base():
  c = recipes.full_precision("resnet20", "fashion_mnist")
  c.batch_size, c.crop_pad, c.flip = 128, 2, True
  c.optimizer.name, c.optimizer.momentum, c.optimizer.nesterov = "sgd", 0.9, True
  c.optimizer.decay, c.optimizer.warmup_epochs, c.optimizer.weight_decay = "one_cycle", 0.0, 5e-4
  c.log_every_steps, c.checkpoint_every_steps = 50, 500
  return c


def get_config(arg: str = "biper_stage1"):
  (arg,) = recipes.parse(arg, {"stage": (*BIPER, "identity")}, "biper_stage1")
  c = base()
  if arg == "identity":
    c.num_epochs, c.optimizer.learning_rate = IDENTITY_EPOCHS, IDENTITY_LR
    return c
  kernel, epochs, lr, wd = BIPER[arg]
  c.quantization.kernel_quantizer = {"name": kernel, "omega0": recipes.OMEGA0}
  c.quantization.input_quantizer = {"name": "approx_sign"}
  c.quantization.scaling, c.quantization.prenorm = "learned", True
  c.num_epochs, c.optimizer.learning_rate, c.optimizer.weight_decay = epochs, lr, wd
  if arg == "biper_stage2":
    c.init_from = "runs/fast_biper/biper_stage1"
  return c
