"""Atomic file writes, locks and small file helpers (imports nothing heavy).

`atomic_write(path, write)` writes through a temporary file in the same folder,
flushes it to disk and renames it into place, so a reader (or a run resumed
after SIGKILL) sees the old file or the new one, never half of one.

`FolderLock(folder)` is an exclusive `fcntl.flock` on `folder/.lock`; the file
holds the holder's process id, which the error message names. The operating
system releases the lock when its process dies, so a lock left by a killed
process is taken over by the next run without any clean-up. `file_lock(path)`
instead waits for the lock (the processes of a distributed search take turns).
"""

import contextlib
import json
import os
import uuid

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here
    fcntl = None

LOCK_FILE = ".lock"


def atomic_write(path, write, mode="wb"):
    """Calls `write(f)` on a temporary file, fsyncs it and renames it to `path`."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_json(path, obj):
    """Writes `obj` as indented JSON to `path` atomically."""
    return atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode="w")


def remove_temporaries(folder):
    """Removes files left by an `atomic_write` of a killed process."""
    for name in os.listdir(folder):
        if ".tmp-" in name:
            os.remove(os.path.join(folder, name))


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """Exclusive lock on a folder for the lifetime of a process (or a `with` block).

    Args:
        folder: the folder to lock (created if needed).
        what: how the error message calls the folder (e.g. "output folder").

    Raises:
        FolderInUse: on `acquire()`, when another live process holds it.
    """

    def __init__(self, folder, what="folder"):
        self.folder = os.fspath(folder)
        self.what = what
        self.path = os.path.join(self.folder, LOCK_FILE)
        self._fd = None

    def acquire(self):
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise FolderInUse(
                    f"The {self.what} '{self.folder}' is in use by process {holder} "
                    f"(lock {self.path}); wait for it to finish, stop it, or choose another folder."
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


@contextlib.contextmanager
def file_lock(path, on_wait=None):
    """Waits for an exclusive `flock` on `path`, holds it for the block (a no-op
    without `fcntl`); `on_wait()` is called first if another process holds it."""
    if fcntl is None:
        yield
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def rss_mb():
    """Resident memory of this process in MiB (Linux `/proc`), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        return None
