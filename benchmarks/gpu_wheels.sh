#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on a GPU machine without a package
# registry whose image already has JAX, PyTorch, NumPy, SciPy, scikit-learn,
# h5py and numba (CUDA builds), but not Keras, soundfile or librosa.
#
#   bash benchmarks/gpu_wheels.sh DIR [PYTHON_VERSION]   # e.g. .whl 3.12
#
# Downloads (here, where pip reaches an index) the pure-Python and manylinux
# x86-64 wheels of those packages and the ones they need that such images
# lack, for the target machine's Python (default 3.12), into DIR (under 15 MB).
# TensorFlow is not among them: its wheel alone is several hundred MB.
set -euo pipefail
DIR=${1:?usage: gpu_wheels.sh DIR [PYTHON_VERSION]}
PYV=${2:-3.12}
mkdir -p "$DIR"
# The versions this machine's Python has (the ones the project was tested with), else the newest.
pin() { python3 -c "import importlib.metadata as m, sys; print(sys.argv[1] + '==' + m.version(sys.argv[1]))" "$1" 2>/dev/null || echo "$1"; }
python3 -m pip download -q --only-binary=:all: --no-deps -d "$DIR" \
  --python-version "$PYV" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any \
  "$(pin keras)" namex optree "$(pin soundfile)" "$(pin librosa)" audioread soxr pooch decorator \
  platformdirs lazy_loader "setuptools>=68" wheel
ls -la "$DIR"
du -sh "$DIR"
