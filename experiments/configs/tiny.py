"""A seconds-long smoke run: tiny_cnn with BiPer on generated, learnable data.

  python -m experiments.cifar --config=experiments/configs/tiny.py --workdir=runs/tiny

No download; the tests and the notebooks' CPU mode use this config. An argument
names a registered method to train with its own settings instead of BiPer (as
quick.py's; the sweep's tests use it):

  python -m experiments.sweep --config=experiments/configs/tiny.py --seeds=2
  python -m experiments.time_to_accuracy --config=experiments/configs/tiny.py --workdir=runs/t
"""

from experiments.configs import recipes
from fda_biper_jax.train.config import default as get_base_config


def get_config(method: str = ""):
  c = get_base_config()
  c.dataset = "synthetic"
  c.synthetic.num_train, c.synthetic.num_test = 256, 128
  c.synthetic.image_shape, c.synthetic.num_classes = (8, 8, 3), 4
  c.model = "tiny_cnn"
  c.quantization.kernel_quantizer = {"name": "biper", "omega0": 20.0}
  c.quantization.input_quantizer = {"name": "approx_sign"}
  c.quantization.scaling = "learned"
  c.quantization.prenorm = True
  c.num_epochs, c.batch_size = 2, 32
  c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay = "adam", 3e-3, 0.0
  c.crop_pad = 1
  c.log_every_steps, c.checkpoint_every_steps, c.eval_every_epochs = 4, 4, 1
  c.tensorboard = False
  # One device: a tiny step on 8 fake CPU devices costs about 1.6x (dispatch and collectives
  # dominate), and data parallelism has its own tests (1 against 8 devices, two hosts).
  c.num_devices = 1
  if method:
    name, _, variant = method.partition("/")
    c.quantization = recipes.usage(name, variant)
  return c


# experiments.time_to_accuracy's stages (its tests): BiPer's two, stage 2 from stage 1.
STAGES = {"biper": ("biper_sine", "biper")}
