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


FREE_SPACE_CHILD = textwrap.dedent(
    """
    import ctypes, json
    from byola_keras import allocator
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    PAGE = 4096

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    # 4,000 blocks of 60 KiB (under malloc's mmap threshold: from the heap),
    # every page written; all but the last freed, which keeps the freed space
    # below the heap's top, where free() does not give it back by itself.
    size, count = 60 << 10, 4000
    blocks = [libc.malloc(size) for _ in range(count)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    before_free = allocator.free_bytes()
    for block in blocks[:-1]:
        libc.free(block)
    after_free, rss_freed = allocator.free_bytes(), rss()
    returned = allocator.return_free_memory()
    print(json.dumps({"before_free": before_free, "after_free": after_free, "returned": returned,
                      "rss_freed": rss_freed, "rss_trimmed": rss(), "freed": size * (count - 1)}))
    """
)


def test_free_space_inside_the_heap_is_measured_and_given_back():
    """`free_bytes()` sees freed blocks that stay inside the heap, and
    `return_free_memory()` takes their pages out of the resident memory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", FREE_SPACE_CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    freed = result["freed"]
    assert result["after_free"] - result["before_free"] >= 0.9 * freed
    assert result["returned"] is True
    assert result["rss_freed"] - result["rss_trimmed"] >= 0.9 * freed


def _huge_pages_glibc():
    from byola_keras import allocator

    return (allocator.glibc_version() or (0, 0)) >= (2, 35)


def test_jax_restarts_with_huge_pages_only_where_they_are_missing_and_possible(tmp_path, monkeypatch):
    from byola_keras import allocator

    madvise = tmp_path / "madvise"
    madvise.write_text("always [madvise] never\n")
    never = tmp_path / "never"
    never.write_text("always madvise [never]\n")
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "byola_keras.cli", "pretrain", "--epochs", "1"])
    calls = []

    def restart(backend, environ, thp=madvise):
        return allocator.restart_with_huge_pages(
            backend, environ, str(thp), execve=lambda *call: calls.append(call)
        )

    assert restart("jax", {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is _huge_pages_glibc()
    if _huge_pages_glibc():
        assert calls == [(
            sys.executable, [sys.executable, "-m", "byola_keras.cli", "pretrain", "--epochs", "1"],
            {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
             allocator.RESTARTED_ENV: "1"},
        )]
    calls.clear()
    assert restart("torch", {}) is False and restart("tensorflow", {}) is False
    assert restart("jax", {}, thp=never) is False  # THP off in the kernel
    assert restart("jax", {}, thp=tmp_path / "missing") is False
    assert restart("jax", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is False  # the user's choice
    assert restart("jax", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is False
    assert restart("jax", {allocator.ENV_VAR: "0"}) is False  # malloc left as started
    assert restart("jax", {allocator.RESTARTED_ENV: "1"}) is False  # once
    assert calls == []


RESTART_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from byola_keras import allocator
    print("start", flush=True)
    allocator.restart_with_huge_pages("jax", thp_enabled_file=sys.argv[1])
    print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES"),
                      "huge_pages": allocator.malloc_uses_huge_pages(thp_enabled_file=sys.argv[1])}))
    """
)


def test_the_program_runs_again_as_the_same_process_with_huge_pages_for_malloc(tmp_path):
    """A real `execve`: the same process id and arguments, the tunable added,
    and the code before the restart run once per start (twice in all)."""
    thp = tmp_path / "enabled"
    thp.write_text("always [madvise] never\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "BYOLA_REUSE_FREED_MEMORY")}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", RESTART_CHILD, str(thp)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["pid"] == child.pid and result["argv"] == [str(thp)]
    if _huge_pages_glibc():
        assert lines[:-1] == ["start", "start"]
        assert result["tunables"] == "glibc.malloc.hugetlb=1" and result["huge_pages"] is True
    else:
        assert lines[:-1] == ["start"] and result["tunables"] is None


def test_huge_pages_tunable_is_read_and_added_among_other_tunables():
    from byola_keras import allocator

    assert allocator.huge_pages_requested("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert not allocator.huge_pages_requested("glibc.malloc.hugetlb=0")
    assert not allocator.huge_pages_requested("glibc.malloc.hugetlb=10")
    assert not allocator.huge_pages_requested(None)
    assert allocator.tunables_with_huge_pages() == "glibc.malloc.hugetlb=1"
    both = allocator.tunables_with_huge_pages("glibc.malloc.arena_max=2")
    assert both == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert allocator.huge_pages_requested(both)
