"""Keep memory freed between training steps in the process (glibc malloc).

On a CPU, the JAX and PyTorch backends allocate a training step's
temporaries at the start of the step and free them at its end. glibc's
malloc gives blocks that large back to the operating system (`munmap`, or by
trimming the heap), so the next step page-faults every page back in.

`reuse_freed_memory()` sets three glibc malloc options with `mallopt`: one
heap for all threads (`M_ARENA_MAX=1`), large blocks from that heap instead
of `mmap` (`M_MMAP_MAX=0`), and no trimming of the heap
(`M_TRIM_THRESHOLD` at its maximum). Freed memory then stays in the process
and the next step reuses it without page faults. The cost: the process's
resident memory no longer shrinks after a peak, and the peak can be higher
(the heap fragments). TensorFlow pools its CPU memory itself and is not
affected. Call it before the backend starts its threads (before building a
model); the options are per process.

It is meant for pretraining on a CPU and for the benchmarks, which call
`reuse_freed_memory_unless_disabled()` (`BYOLA_REUSE_FREED_MEMORY=0` keeps
malloc's defaults). Measurements: `benchmarks/NOTES.md`.

On JAX the one heap fragments: XLA's temporaries of a step are one block of
hundreds of MiB, and small allocations made while it was in use (other
threads', the next batch's) split the hole it leaves, so later steps' blocks
go on top of the heap. Where Python was started with glibc's transparent
huge pages for malloc (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, a kernel
with THP `madvise` or `always`), the block is mapped anew every step but
faulted in 2 MiB at a time, and malloc's defaults are both faster and far
smaller on JAX: `reuse_freed_memory_unless_disabled("jax")` keeps them
there (`malloc_uses_huge_pages()`). PyTorch keeps the reuse: huge pages
did not make its steps faster (`benchmarks/NOTES.md`).

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
THP_ENABLED_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def reuse_freed_memory():
    """Makes glibc malloc keep freed memory for reuse (see the module docstring).

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


def malloc_uses_huge_pages(environ=None, thp_enabled_file=None):
    """Whether glibc malloc maps memory with transparent huge pages in this
    process: `GLIBC_TUNABLES` asks for `glibc.malloc.hugetlb=1` (glibc reads
    it when the process starts) and the kernel's THP mode is `always` or
    `madvise`."""
    environ = os.environ if environ is None else environ
    thp_enabled_file = thp_enabled_file or THP_ENABLED_FILE
    tunables = dict(
        item.split("=", 1) for item in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item
    )
    if tunables.get("glibc.malloc.hugetlb", "").strip() != "1":
        return False
    try:
        with open(thp_enabled_file) as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def reuse_freed_memory_unless_disabled(backend=None):
    """`reuse_freed_memory()` unless `BYOLA_REUSE_FREED_MEMORY=0`, or `backend`
    is `"jax"` and malloc uses transparent huge pages (see the module
    docstring); returns whether applied."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if backend == "jax" and malloc_uses_huge_pages():
        return False
    return reuse_freed_memory()
