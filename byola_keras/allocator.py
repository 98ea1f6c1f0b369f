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
there (`malloc_uses_huge_pages()`). glibc reads the tunable only when a
process starts, so `restart_with_huge_pages("jax")` runs the program again
with it where it is missing and huge pages are possible (the command line
does this for `pretrain` on a CPU). PyTorch keeps the reuse: huge pages
did not make its steps faster (`benchmarks/NOTES.md`).

`free_bytes()` and `return_free_memory()` read and return to the operating
system the free space inside malloc's heaps (`mallinfo2`, `malloc_trim`);
`byola_keras.backend.trim_after_compile` uses them after XLA compilations.

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
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
RESTARTED_ENV = "BYOLA_RESTARTED_FOR_HUGE_PAGES"


def reuse_freed_memory():
    """Makes glibc malloc keep freed memory for reuse (see the module docstring).

    Returns `True` when the options were set, `False` where there is nothing
    to set (not Linux, or a C library other than glibc): a no-op there.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not Linux, or musl and other C libraries
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # -1 is the largest threshold (glibc reads it as an unsigned size).
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
        )
    ]


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def free_bytes():
    """Bytes free inside malloc's heaps, all arenas (glibc's `mallinfo2`), or
    None where it cannot be read (not glibc, or glibc older than 2.33)."""
    libc = _libc()
    mallinfo2 = getattr(libc, "mallinfo2", None)
    if mallinfo2 is None:
        return None
    mallinfo2.argtypes = ()
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def return_free_memory():
    """Gives the whole pages inside malloc's free space back to the operating
    system (glibc's `malloc_trim(0)`, every arena); returns whether any was
    given back, or False where there is no glibc."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return trim(0) == 1


def glibc_version():
    """glibc's version as `(major, minor)`, or None (another C library)."""
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
        return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def huge_pages_possible(thp_enabled_file=None):
    """Whether malloc could map its memory with transparent huge pages here:
    glibc >= 2.35 (the `glibc.malloc.hugetlb` tunable) and the kernel's THP
    mode `always` or `madvise`."""
    version = glibc_version()
    if version is None or version < (2, 35):
        return False
    try:
        with open(thp_enabled_file or THP_ENABLED_FILE) as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def _tunables(environ):
    return dict(item.split("=", 1) for item in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item)


def huge_pages_requested(glibc_tunables):
    """Whether a `GLIBC_TUNABLES` value asks for `glibc.malloc.hugetlb=1`."""
    return _tunables({"GLIBC_TUNABLES": glibc_tunables or ""}).get(HUGE_PAGES_TUNABLE, "").strip() == "1"


def tunables_with_huge_pages(glibc_tunables=""):
    """A `GLIBC_TUNABLES` value: `glibc_tunables` plus `glibc.malloc.hugetlb=1`."""
    return f"{glibc_tunables}:{HUGE_PAGES_TUNABLE}=1" if glibc_tunables else f"{HUGE_PAGES_TUNABLE}=1"


def malloc_uses_huge_pages(environ=None, thp_enabled_file=None):
    """Whether glibc malloc maps memory with transparent huge pages in this
    process: `GLIBC_TUNABLES` asks for `glibc.malloc.hugetlb=1` (glibc reads
    it when the process starts) and `huge_pages_possible()`."""
    environ = os.environ if environ is None else environ
    if not huge_pages_requested(environ.get("GLIBC_TUNABLES")):
        return False
    return huge_pages_possible(thp_enabled_file)


def opted_out(environ=None):
    """`BYOLA_REUSE_FREED_MEMORY=0` (or false/no/off): malloc left as the process started."""
    environ = os.environ if environ is None else environ
    return environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off")


def restart_with_huge_pages(backend, environ=None, thp_enabled_file=None, execve=None):
    """On JAX, where malloc could use transparent huge pages but this process
    was started without `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, runs this
    program again with it: `os.execve` of `sys.executable` with
    `sys.orig_argv` (the same process id, arguments, open files and
    environment, plus the tunable). Does not return then; returns False where
    there is nothing to do (another backend, `BYOLA_REUSE_FREED_MEMORY=0`,
    the tunable already given, no huge pages here, or already restarted once).

    For a program's start (the command line), before anything else runs: what
    the process did before is lost."""
    environ = os.environ if environ is None else environ
    if backend != "jax" or opted_out(environ) or environ.get(RESTARTED_ENV):
        return False
    if HUGE_PAGES_TUNABLE in _tunables(environ) or not huge_pages_possible(thp_enabled_file):
        return False
    argv = getattr(sys, "orig_argv", None)
    if not argv or not sys.executable:
        return False
    env = dict(environ)
    env["GLIBC_TUNABLES"] = tunables_with_huge_pages(env.get("GLIBC_TUNABLES", ""))
    env[RESTARTED_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    (execve or os.execve)(sys.executable, list(argv), env)
    return True  # only a stand-in execve returns


def reuse_freed_memory_unless_disabled(backend=None):
    """`reuse_freed_memory()` unless `BYOLA_REUSE_FREED_MEMORY=0`, or `backend`
    is `"jax"` and malloc uses transparent huge pages (see the module
    docstring); returns whether applied."""
    if opted_out():
        return False
    if backend == "jax" and malloc_uses_huge_pages():
        return False
    return reuse_freed_memory()
