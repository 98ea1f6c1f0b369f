"""`byola_keras.allocator.reuse_freed_memory()`: freed blocks are reused without page faults.

Each case runs in a fresh Python process (malloc options are per process and
must be set before threads pick their heaps). The child allocates a 64 MB
block on a worker thread, as XLA and PyTorch allocate a step's temporaries,
writes every page, frees it, and does it again; it reports the minor page
faults of the second round. With glibc's defaults the block is `mmap`ed and
returned to the system each time, so every page faults again (16,384 pages);
with the options set, the second block reuses the first one's pages.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import ctypes, json, resource, sys, threading
    from byola_keras import allocator
    applied = allocator.reuse_freed_memory() if sys.argv[1] == "reuse" else None
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    SIZE = 64 << 20
    faults = []

    def one_round():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(SIZE)
        ctypes.memset(block, 1, SIZE)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    def worker():
        for _ in range(3):
            one_round()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    print(json.dumps({"applied": applied, "faults": faults}))
    """
)


def _run(mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options (Linux)")
def test_freed_memory_is_reused_without_page_faults():
    default = _run("default")
    reuse = _run("reuse")
    pages = (64 << 20) // 4096
    # Defaults: every round faults in (nearly) every page of the block again.
    assert min(default["faults"][1:]) > 0.9 * pages, default
    # Options set: only the first round faults; later rounds reuse its pages.
    assert reuse["applied"] is True
    assert reuse["faults"][0] > 0.9 * pages, reuse
    assert max(reuse["faults"][1:]) < 0.02 * pages, reuse


def test_reuse_can_be_disabled_by_environment(monkeypatch):
    from byola_keras import allocator

    monkeypatch.setenv(allocator.ENV_VAR, "0")
    assert allocator.reuse_freed_memory_unless_disabled() is False


def test_huge_pages_for_malloc_are_read_from_glibc_tunables(tmp_path):
    from byola_keras import allocator

    madvise = tmp_path / "madvise"
    madvise.write_text("always [madvise] never\n")
    never = tmp_path / "never"
    never.write_text("always madvise [never]\n")
    on = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    assert allocator.malloc_uses_huge_pages(on, str(madvise)) is True
    assert allocator.malloc_uses_huge_pages(on, str(never)) is False  # THP off in the kernel
    assert allocator.malloc_uses_huge_pages(on, str(tmp_path / "missing")) is False
    assert allocator.malloc_uses_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, str(madvise)) is False
    assert allocator.malloc_uses_huge_pages({}, str(madvise)) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options (Linux)")
def test_jax_keeps_mallocs_defaults_where_malloc_uses_huge_pages(tmp_path):
    """With huge pages for malloc, JAX keeps malloc's defaults (the step's
    block mapped per step, no heap to fragment); PyTorch still reuses freed
    memory. Each in a fresh process, whose glibc read `GLIBC_TUNABLES`."""
    code = (
        "import json, sys\n"
        "from byola_keras import allocator\n"
        "allocator.THP_ENABLED_FILE = sys.argv[2]\n"
        "print(json.dumps(allocator.reuse_freed_memory_unless_disabled(sys.argv[1])))\n"
    )
    thp = tmp_path / "enabled"
    thp.write_text("always [madvise] never\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "BYOLA_REUSE_FREED_MEMORY"}
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    applied = {}
    for tunables in ("", "glibc.malloc.hugetlb=1"):
        for backend in ("jax", "torch"):
            out = subprocess.run(
                [sys.executable, "-c", code, backend, str(thp)], capture_output=True, text=True,
                env={**env, "GLIBC_TUNABLES": tunables}, timeout=120,
            )
            assert out.returncode == 0, out.stderr
            applied[tunables, backend] = json.loads(out.stdout.strip().splitlines()[-1])
    assert applied == {
        ("", "jax"): True, ("", "torch"): True,
        ("glibc.malloc.hugetlb=1", "jax"): False, ("glibc.malloc.hugetlb=1", "torch"): True,
    }
