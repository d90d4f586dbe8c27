#!/usr/bin/env bash
# Both benchmarks on a CUDA machine, in under 5 minutes: the ddpm-cifar10 preset at batch 128 in bf16; then the
# training benchmark again with --compile --compile_mode reduce-overhead --channels_last (CUDA graphs: the flags that
# reach issue 16's targets). check_syncs.py: no host sync in a training step.
# Prints the ratios; record the output in benchmarks/RESULTS.md with the card's name.
#   bash benchmarks/gpu_check.sh            (after `pip install -e .`; or with the wheels that
#                                           benchmarks/fetch_gpu_wheels.sh puts in .whl/, see below)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # a machine without the registries: carried wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, accelerate, datasets; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"
python3 benchmarks/bench_train.py --device cuda --preset ddpm-cifar10 --batch 128 --resolution 32 \
  --mixed_precision bf16 --steps 20 --warmup 5 --repeats 1 --num_images 1024 2>&1 | tee "$OUT/bench_train.txt"
python3 benchmarks/bench_sample.py --device cuda --preset ddpm-cifar10 --batch 16 --resolution 32 \
  --sampling_steps 20 --repeats 2 2>&1 | tee "$OUT/bench_sample.txt"
python3 benchmarks/check_syncs.py --device cuda 2>&1 | tee "$OUT/check_syncs.txt"
# Last, as it compiles the UNet twice (ours and the floor; a minute or two each): the options the peer lacks.
python3 benchmarks/bench_train.py --device cuda --preset ddpm-cifar10 --batch 128 --resolution 32 \
  --mixed_precision bf16 --compile --compile_mode reduce-overhead --channels_last --steps 20 --warmup 5 --repeats 1 --num_images 1024 2>&1 \
  | tee "$OUT/bench_train_compile.txt"
