"""TensorFlow's oneDNN CPU kernels on every x86-64 CPU.

TensorFlow ships two sets of CPU kernels for convolutions, matrix products and
batch norm: Eigen's and oneDNN's. Which one runs is decided once, when
TensorFlow loads, by `TF_ENABLE_ONEDNN_OPTS`; left unset, TensorFlow turns
oneDNN on for some CPUs only (it stayed off on an AVX2 AMD EPYC with
TensorFlow 2.21, on by default on the AVX-512 machines the earlier
benchmarks ran on). On that AVX2 CPU oneDNN made the whole training step
1.36x faster (v1 d=512, batch 64; `docs/performance.md`), so `import
byola_keras` asks for it on x86-64 unless the variable is already set.

It only takes effect when `byola_keras` is imported before TensorFlow (the
command line does; in a script, import `byola_keras` before `keras`, or
export `TF_ENABLE_ONEDNN_OPTS=1`). `TF_ENABLE_ONEDNN_OPTS=0` keeps Eigen's
kernels.
"""

import os
import platform
import sys

VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


def request_onednn():
    """Set `TF_ENABLE_ONEDNN_OPTS=1` on x86-64 unless it is set already.
    Returns whether TensorFlow will read it (it is not loaded yet)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    os.environ.setdefault(VARIABLE, "1")
    return "tensorflow" not in sys.modules
