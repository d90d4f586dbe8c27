#!/usr/bin/env bash
# Wheels for a lent GPU machine that cannot reach the package registries (Python 3.12, x86_64): the versions this
# project is tested with, of the packages that machine lacked (its image has torch, accelerate and tensorboard).
# Run here, in the repository root; then carry .whl to the machine and run `bash benchmarks/gpu_check.sh`, which
# installs them to /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1 fsspec==2026.9.0
  # (its image had huggingface_hub, safetensors and xxhash; the carry limit is 64 MiB with the working tree)
du -sh .whl
