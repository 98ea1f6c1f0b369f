"""File helpers of the search folder: a lock, atomic JSON writes, resident memory.

Processes of a distributed search share the folder, so files are replaced
atomically and the data preparation runs under an exclusive lock.
"""

import contextlib
import json
import os


@contextlib.contextmanager
def file_lock(path):
    """An exclusive lock on `path` (POSIX `flock`); a no-op where unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_json(path, obj):
    """Writes `obj` as JSON to `path` through a temporary file and `os.replace`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


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
