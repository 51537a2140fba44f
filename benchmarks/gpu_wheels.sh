#!/bin/sh
# Downloads into .gpu_wheels/ (ignored by git) the Python 3.12 x86_64 wheels that the GPU machine
# lacks for benchmarks/gpu.py: tokamax and its dependencies, and what moe_jax's configs, data and
# training code import beyond the device image's jax 0.11 (CUDA), flax and optax. Versions are
# requirements.txt's pins; no dependencies are resolved here (--no-deps), so that jax and jaxlib
# are not fetched. BENCHMARKS.md ("GPU: tokamax") gives the commands that use the folder.
#   sh benchmarks/gpu_wheels.sh           # here: download (then carry .gpu_wheels along)
#   sh benchmarks/gpu_wheels.sh install   # there: install the wheels of what is not installed
# The install takes each missing package from the folder without resolving dependencies
# (--no-index --no-deps), so the image's own packages (jax, flax, ...) stay as they are.
set -e
cd "$(dirname "$0")/.."
if [ "$1" = install ]; then
  python=${PYTHON:-python3}
  missing=""
  for wheel in .gpu_wheels/*.whl; do
    $python -m pip show "$(basename "$wheel" | cut -d- -f1)" >/dev/null 2>&1 || missing="$missing $wheel"
  done
  [ -z "$missing" ] || $python -m pip install --no-index --no-deps $missing
  exit 0
fi
PACKAGES="tokamax einshape jaxtyping wadler_lindig pydantic pydantic_core annotated-types
typing-inspection qwix typeguard immutabledict tensorboardX absl-py tqdm typing_extensions
ml_collections PyYAML grain array_record cloudpickle dm-tree tensorflow-datasets
tensorflow-metadata googleapis-common-protos protobuf simple-parsing docstring_parser
etils importlib_resources zipp toml termcolor wrapt psutil requests urllib3 idna certifi
charset-normalizer six attrs"
SOURCE_ONLY="promise"  # pure Python, published as a source archive only: built into a wheel here
pinned() {
  for name in "$@"; do
    grep -i "^$name==" requirements.txt || { echo "$name is not pinned in requirements.txt" >&2; exit 1; }
  done
}
pins=$(pinned $PACKAGES)
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest .gpu_wheels \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any $pins
python3 -m pip wheel --quiet --no-deps --wheel-dir .gpu_wheels $(pinned $SOURCE_ONLY)
du -sh .gpu_wheels
