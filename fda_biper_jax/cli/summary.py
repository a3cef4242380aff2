"""Per-layer precision, parameters, memory and MACs of a zoo model (`fda-biper-jax-summary`).

  fda-biper-jax-summary --model=resnet20 [--num_classes=N] [--kernel_quantizer=NAME]
      [--input_quantizer=NAME] [--scaling=S] [--input_shape=H,W,C] [--json]

The table of `fda_biper_jax.summary.summarize`, in the manner of `larq.models.summary`, or
its JSON. The default quantization is BiPer's (kernel 'biper', input 'approx_sign',
scaling 'learned'); `--kernel_quantizer=identity --input_quantizer=identity` shows the
full-precision twin, 'none' leaves an operand without quantizer. A bad flag stops with
one line (exit status 2).
"""

from absl import flags

from fda_biper_jax import layers, methods, models, summary
from fda_biper_jax.cli import command

FLAGS = flags.FLAGS
NO_QUANTIZER = "none"


def define_flags() -> None:
  quantizers = [*methods.names(), NO_QUANTIZER]
  flags.DEFINE_enum("model", None, list(models.NAMES), "The zoo model.")
  flags.DEFINE_integer("num_classes", None, "Classes (default: 1000 for ImageNet models, "
                       "else 10).", lower_bound=1)
  flags.DEFINE_enum("kernel_quantizer", "biper", quantizers, "The kernels' quantizer.")
  flags.DEFINE_enum("input_quantizer", "approx_sign", quantizers, "The inputs' quantizer.")
  flags.DEFINE_enum("scaling", "learned", list(layers.SCALINGS), "The weight scaling.")
  command.define("input_shape", None, lambda text: command.integers(text, 3),
                 "H,W,C: three positive integers",
                 "Per-example input shape (default: from the model name).", command.LIST)
  flags.DEFINE_bool("json", False, "Print the summary as JSON.")
  flags.mark_flag_as_required("model")


def quantizer(name: str) -> str | None:
  return None if name == NO_QUANTIZER else name


def main(argv) -> None:
  command.no_arguments(argv)
  shape = FLAGS.input_shape or summary.default_input_shape(FLAGS.model)
  num_classes = FLAGS.num_classes or (1000 if shape == summary.IMAGENET_SHAPE else 10)
  try:
    model = models.create(FLAGS.model, num_classes,
                          kernel_quantizer=quantizer(FLAGS.kernel_quantizer),
                          input_quantizer=quantizer(FLAGS.input_quantizer),
                          scaling=FLAGS.scaling)
    s = summary.summarize(model, shape)
  except (ValueError, TypeError) as e:
    command.fail(e)
  s.model = FLAGS.model
  print(s.to_json(indent=1) if FLAGS.json else summary.format_table(s))


def run() -> None:
  """The console script."""
  command.run(main, define_flags, doc=__doc__)


if __name__ == "__main__":
  run()
