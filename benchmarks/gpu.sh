#!/usr/bin/env bash
# The GPU measurements of the training step, in one run on a machine with one CUDA GPU:
#
#   bash benchmarks/gpu.sh OUTDIR
#
# 1. The library's step against the PyTorch twin on the GPU (benchmarks.vs_pytorch):
#    resnet20, the float twin and BiPer, float32 and bfloat16, batch 128 and 256.
# 2. The H100/H200 throughput command (benchmarks.train_step's docstring): resnet18_cifar
#    with BiPer and its float twin, batch 256, bfloat16.
# Each writes its table (OUTDIR/*.md) and results (OUTDIR/*.json); the versions and the
# GPU's state go to OUTDIR/environment.txt. Needs jax with its CUDA plugin and torch with
# CUDA in $PYTHON (default python3); stops at once if JAX's backend is not a GPU. A failed
# measurement does not stop the next one; the exit status is 1 if any failed.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUTDIR}
py=${PYTHON:-python3}
mkdir -p "$out"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv || true
  "$py" -c 'import jax, flax, optax, torch
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "torch", torch.__version__, "cuda", torch.version.cuda)
print(jax.devices())
assert jax.default_backend() == "gpu", f"JAX backend is {jax.default_backend()!r}, not gpu"'
} 2>&1 | tee "$out/environment.txt" || exit 1
status=0

"$py" -m benchmarks.vs_pytorch --batch_sizes 128,256 --dtypes float32,bfloat16 \
  --settings identity,biper --frameworks jax,torch --repeats 7 --window_steps 20 \
  --json "$out/vs_pytorch.json" | tee "$out/vs_pytorch.md" || status=1

"$py" -m benchmarks.train_step --models resnet18_cifar --quantizers biper \
  --batch_size 256 --dtype bfloat16 --repeats 7 --window_steps 20 \
  --json "$out/train_step.json" | tee "$out/train_step.md" || status=1
exit $status
