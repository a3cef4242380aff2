"""The training config: every field the trainer reads, with its default.

`default()` is not a recipe: the configs in the repository's
experiments/configs start from it and set what their papers specify, and a
user of the installed package does the same. Any field can be overridden on
the command line, e.g. `--config.optimizer.learning_rate=0.01
--config.num_epochs=5`.

`model` is a zoo name (`fda_biper_jax.models.NAMES`) or the import path of a
factory, 'mypkg.models:create', called as factory(num_classes, dtype=...,
axis_name=..., **model_kwargs); a factory model's quantization is its own
(model_kwargs), a zoo model's is `quantization` (and its `model_kwargs` are
architecture options, `models.architecture`).
"""

import ml_collections


def default() -> ml_collections.ConfigDict:
  """The trainer's config with every default (module docstring)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data: a tfds name (cifar10, cifar100, fashion_mnist, mnist) or 'synthetic'
  # held on device (input='memory'), or any tfds image dataset streamed
  # (input='stream', e.g. imagenet2012); see fda_biper_jax/data/inputs.py.
  c.dataset = "cifar10"
  c.input = "memory"
  c.data_shards = 0   # training-data shards (0 = one per process); fixes the data order
  c.data_dir = ""     # tfds data_dir ('' = tfds default, ~/tensorflow_datasets)
  c.manual_dir = ""   # tfds manual_dir (pre-downloaded files)
  c.crop_pad = 4      # random crop with zero padding; 0 disables
  c.flip = True       # random horizontal flip
  c.synthetic = ml_collections.ConfigDict(dict(
      num_train=512, num_test=256, image_shape=(8, 8, 3), num_classes=4, seed=0))
  c.stream = ml_collections.ConfigDict(dict(
      image_size=224,       # RandomResizedCrop / centre-crop side
      eval_resize=256,      # evaluation: shorter side resized to this, then centre crop
      num_parallel_calls=0,  # tf.data map workers (0 = AUTOTUNE)
      prefetch=2))          # batches in flight to the devices

  # Model and how it is binarized (see fda_biper_jax/layers.py); a quantizer is
  # {'name': ..., **parameters} (fda_biper_jax/methods/), a parameter a number or, where
  # the method allows, a schedule {'schedule': 'geometric', 'start': 2, 'end': 200}.
  c.model = "resnet20"
  # A factory model's keywords, or a zoo model's architecture options (vit_tiny's depth).
  c.model_kwargs = ml_collections.ConfigDict()
  c.quantization = ml_collections.ConfigDict(dict(
      kernel_quantizer={"name": "identity"}, input_quantizer={"name": "identity"},
      scaling="none", prenorm=False))
  c.compute_dtype = "float32"  # or 'bfloat16' (float32 master weights)
  c.bn_scale_init = 1.0      # initial BatchNorm scale (the BiPer ImageNet code: 1e-8)

  # Optimisation.
  c.num_epochs = 200
  c.batch_size = 128         # global, split across devices
  c.eval_batch_size = 0      # 0 = batch_size
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.1, momentum=0.9, nesterov=False, b1=0.9, b2=0.999,
      # weight_decay_mask: 'all', 'kernels' or 're:PATTERN' over parameter paths.
      weight_decay=1e-4, weight_decay_mask="all", warmup_epochs=0.0,
      decay="cosine"))       # 'cosine' (after the warm-up), 'constant' or 'one_cycle'
  c.init_from = ""           # a previous stage's workdir (two-stage recipes)

  # Removed: method settings live in their quantizer's config now. Kept empty so that
  # an old config that sets one stops with one line saying what to write instead.
  c.fda = ml_collections.ConfigDict(dict(n_start=None, n_end=None, alpha_start=None))
  c.bnn_pp = ml_collections.ConfigDict(dict(beta_start=None, beta_end=None))
  c.regularizer_tau = None

  # Running.
  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.log_layer_stats = True   # per-layer Laplace b, QE and sign flips at each eval
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_only = False
  c.tensorboard = True
  c.num_devices = 0          # 0 = all local devices
  c.distributed = False      # jax.distributed.initialize() (several hosts)
  c.coordinator_address = ""
  c.num_processes = 0
  c.process_id = -1
  return c
