"""Keep memory freed between training steps in the process (glibc malloc).

On CPU, the JAX (XLA) and PyTorch backends allocate a training step's
temporaries at the start of the step and free them at its end (about 1.4 GB
for BYOL-A v1 d=2048, batch 64). glibc's malloc gives blocks that large back
to the operating system (with `munmap`, or by trimming the heap), so the
next step page-faults every page back in. Measured on a 2-core CPU (v1
d=2048, batch 64): 0.42 million minor page faults and 0.8 s of system time in
a 2.0 s JAX step, 0.61 million and 1.3 s in a 2.1 s PyTorch step; with this
setting, none, and the steps ran 1.3x and 1.6x faster. TensorFlow pools its
CPU memory itself and is not affected.

`reuse_freed_memory()` sets three glibc malloc options with `mallopt`
(glibc also reads them from the environment variables `MALLOC_ARENA_MAX`,
`MALLOC_MMAP_MAX_` and `MALLOC_TRIM_THRESHOLD_`; not tried here): one heap
for all threads, large blocks from that heap instead of `mmap`, and no
trimming of the heap (measured: with the last two alone, the JAX step above
still had 0.36 million faults). Freed
memory then stays in the process and the next step reuses it without a page
fault. The process's resident memory no longer shrinks after a peak, and its
peak can be higher (measured for a JAX d=2048 step: 3.5 to 4.6 GB in five
runs, against 2.8 GB with the defaults): the heap fragments, and in a long
JAX run it grew over the first 40 steps to 3.95 GB, 2.6 times the 1.5 GB
in use at most, and stayed there. Where that matters more than a few
percent of speed on JAX, leave this off and start Python with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc 2.35+, transparent huge pages
`madvise` or `always`): the defaults then fault the step's temporaries in
2 MB at a time; measured, within 3% of the speed at 2.8 GB. It did not help
PyTorch.

Call it first thing, before the backend starts its threads (before building
a model): called after Keras had started, the JAX step above still had 28,000
faults per step instead of none. The command line
(`byola-keras ...`) and the benchmarks call it; set
`BYOLA_REUSE_FREED_MEMORY=0` to keep malloc's defaults there.

This module does not import Keras.
"""

import ctypes
import os
import sys

# glibc <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

ENV_VAR = "BYOLA_REUSE_FREED_MEMORY"


def reuse_freed_memory():
    """Make glibc malloc keep freed memory for reuse (see the module docstring).

    Returns `True` when the options were set, `False` where there is nothing
    to set (not Linux, or a C library other than glibc): a no-op there.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # -1 is the largest threshold (glibc reads it as an unsigned size).
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)


def reuse_freed_memory_unless_disabled():
    """`reuse_freed_memory()` unless `BYOLA_REUSE_FREED_MEMORY=0`; returns whether applied."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return reuse_freed_memory()
