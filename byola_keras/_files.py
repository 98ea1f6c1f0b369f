"""Atomic file writes, locks and small file helpers (imports nothing heavy).

`atomic_write(path, write)` writes through a temporary file in the same folder,
flushes it to disk and renames it into place, so a reader (or a run resumed
after SIGKILL) sees the old file or the new one, never half of one. A write
that fails (full disk, read-only folder, quota) removes the temporary file and
raises `WriteFailed`, an `OSError` whose message names the file, what it is and
its size. The test hook `BYOLA_TEST_WRITE_FAIL=PATTERN[:N[:ERRNO]]` makes the
N-th write (default 1st) of a file whose name matches PATTERN (`fnmatch`) fail
with ERRNO (default ENOSPC), after the data is written, before the rename.

`cache_root()` is the folder byola-keras keeps its caches in (the
built-in corpus, embeddings, autotune choices, compiled programs).

`FolderLock(folder)` is an exclusive `fcntl.flock` on `folder/.lock`; the file
holds the holder's process id, which the error message names. The operating
system releases the lock when its process dies, so a lock left by a killed
process is taken over by the next run without any clean-up. `file_lock(path)`
instead waits for the lock (the processes of a distributed search take turns).
"""

import contextlib
import errno as errno_lib
import fnmatch
import json
import os
import uuid

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here
    fcntl = None

LOCK_FILE = ".lock"


def cache_root():
    """`$BYOLA_KERAS_CACHE`, else `byola-keras` in `$XDG_CACHE_HOME` or `~/.cache`."""
    base = os.environ.get("BYOLA_KERAS_CACHE")
    if base:
        return base
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "byola-keras")


WRITE_FAIL_ENV = "BYOLA_TEST_WRITE_FAIL"
_write_counts = {}


class WriteFailed(OSError):
    """A file could not be written (the operating system's error is `__cause__`).

    Attributes:
        path: the file.
        what: what it holds, in words (e.g. "the checkpoint").
        size: its size in bytes, when known.
        written: bytes written when the write failed.
        hint: a sentence added to the message by the caller (how to go on).
    """

    def __init__(self, path, what, size, written, cause):
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path = os.fspath(path)
        self.what = what
        self.size = size
        self.written = written
        self.hint = ""

    def __str__(self):
        what = f"{self.what} '{self.path}'" if self.what else f"'{self.path}'"
        if self.size is not None:
            size = format_size(self.size)
        elif self.written:
            size = f"{format_size(self.written)} written when it failed"
        else:
            size = "it failed before its first byte"
        name = errno_lib.errorcode.get(self.errno, str(self.errno))
        text = f"Could not write {what} ({size}): {self.strerror} ({name})."
        return f"{text} {self.hint}" if self.hint else text

    def __reduce__(self):
        return (_rebuild_write_failed, (self.path, self.what, self.size, self.written, self.errno,
                                        self.strerror, self.hint))


def _rebuild_write_failed(path, what, size, written, errno, strerror, hint):
    error = WriteFailed(path, what, size, written, OSError(errno, strerror))
    error.hint = hint
    return error


def format_size(size):
    """`size` bytes in words: "512 bytes", "3.4 kB", "12.3 MB", "1.2 GB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} bytes"


def how_to_fix(error, folder):
    """What to do about the `OSError` of a failed write in `folder`, in words."""
    if error.errno == errno_lib.ENOSPC:
        return f"free some space on the disk of '{folder}'"
    if error.errno == getattr(errno_lib, "EDQUOT", None):
        return f"free some space or raise your disk quota for '{folder}'"
    if error.errno in (errno_lib.EROFS, errno_lib.EACCES, errno_lib.EPERM):
        return f"make '{folder}' writable"
    return "fix the cause"


def injected_write_error(path):
    """The `OSError` the test hook `BYOLA_TEST_WRITE_FAIL` asks this write of
    `path` to raise, or None."""
    spec = os.environ.get(WRITE_FAIL_ENV)
    if not spec:
        return None
    pattern, _, rest = spec.partition(":")
    nth, _, name = rest.partition(":")
    if not fnmatch.fnmatch(os.path.basename(os.fspath(path)), pattern):
        return None
    _write_counts[spec] = count = _write_counts.get(spec, 0) + 1
    if count != int(nth or 1):
        return None
    code = getattr(errno_lib, name or "ENOSPC")
    return OSError(code, os.strerror(code))


def atomic_write(path, write, mode="wb", what=None, size=None):
    """Calls `write(f)` on a temporary file, fsyncs it and renames it to `path`.

    Raises `WriteFailed` (naming `what`, e.g. "the checkpoint", and `size` in
    bytes when known) if any step fails with an `OSError`; the temporary file
    is removed.
    """

    def save(tmp):
        with open(tmp, mode) as f:
            write(f)

    return _replace_with(path, save, what, size, suffix="")


def atomic_save(path, save, what=None):
    """Like `atomic_write`, for writers that take a file name: `save(tmp)`
    writes a temporary file (with `path`'s extension), then it is fsynced and
    renamed to `path`."""
    return _replace_with(path, save, what, None, suffix=os.path.splitext(os.fspath(path))[1])


def _replace_with(path, save, what, size, suffix):
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}{suffix}"
    try:
        save(tmp)
        injected = injected_write_error(path)
        if injected is not None:
            raise injected
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        written = _remove_quietly(tmp)
        if isinstance(error, OSError) and not isinstance(error, WriteFailed):
            raise WriteFailed(path, what, size, written, error) from error
        raise
    return path


def _remove_quietly(path):
    """Removes `path` if it exists; returns its size (0 if there was none)."""
    try:
        size = os.path.getsize(path)
        os.remove(path)
        return size
    except OSError:
        return 0


def atomic_write_json(path, obj, what=None):
    """Writes `obj` as indented JSON to `path` atomically."""
    text = json.dumps(obj, indent=2)
    return atomic_write(path, lambda f: f.write(text), mode="w", what=what, size=len(text.encode()))


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
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            failed = WriteFailed(self.path, f"the {self.what}'s lock", None, 0, error)
            fix = how_to_fix(error, self.folder)
            failed.hint = f"{fix[0].upper()}{fix[1:]} or choose another folder."
            raise failed from error
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
