"""The measured search behind fast.py's recipes: optimizer, peak learning rate and schedule.

  python -m experiments.sweep --config=experiments/configs/fast_search.py --seeds=1 \
      --workdir=runs/recipe_search --readme=docs/results.md --publish_dir=docs/recipe_search
  python -m experiments.cifar --config=experiments/configs/fast_search.py:identity/sgd_lr0.2 \
      --workdir=runs/identity_sgd_lr0.2

Each run, 'STAGE/POINT', is fast.py's STAGE (`biper_stage1`, `biper_stage2`,
`identity`) with POINT's optimizer settings, for SEARCH_EPOCHS epoch(s) on
the same data, model and batch. Stage 2 starts from fast.py's stage-1
checkpoint (runs/fast_biper/biper_stage1, which the README's main job
writes), so its points compare exactly the recipe's second stage; stage 1
and the float twin train one epoch of their 2 and 3, a proxy that ranks
learning rates and optimizers at a tenth of the recipe's cost (each point
is about 3 minutes of a 2-core CPU). SGD points keep fast.py's Nesterov
momentum, one-cycle schedule and weight decay; 'adam' is quick.py's Adam
(lr 1e-3, cosine, no weight decay); 'warmup_cosine' replaces one-cycle by
a 0.2-epoch linear warm-up and cosine decay.
"""

from experiments.configs import fast, recipes

SEARCH_EPOCHS = 1


def sgd(lr: float) -> dict:
  return {"learning_rate": lr}


ADAM = {"name": "adam", "learning_rate": 1e-3, "decay": "cosine", "weight_decay": 0.0}
WARMUP_COSINE = {"learning_rate": 0.1, "decay": "cosine", "warmup_epochs": 0.2}

# stage: {point: optimizer fields}
POINTS = {
    "biper_stage1": {"sgd_lr0.05": sgd(0.05), "sgd_lr0.1": sgd(0.1), "sgd_lr0.2": sgd(0.2),
                     "sgd_lr0.1_warmup_cosine": WARMUP_COSINE, "adam_lr0.001": ADAM},
    "biper_stage2": {"sgd_lr0.005": sgd(0.005), "sgd_lr0.02": sgd(0.02), "sgd_lr0.05": sgd(0.05)},
    "identity": {"sgd_lr0.05": sgd(0.05), "sgd_lr0.1": sgd(0.1), "sgd_lr0.2": sgd(0.2),
                 "adam_lr0.001": ADAM},
}
RUNS = tuple(f"{stage}/{point}" for stage, points in POINTS.items() for point in points)


def get_config(arg: str = "biper_stage1/sgd_lr0.1"):
  (arg,) = recipes.parse(arg, {"run": RUNS}, "biper_stage1/sgd_lr0.1")
  stage, _, point = arg.partition("/")
  c = fast.get_config(stage)
  c.num_epochs = SEARCH_EPOCHS
  for field, value in POINTS[stage][point].items():
    setattr(c.optimizer, field, value)
  return c
