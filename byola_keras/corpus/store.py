"""The output folder of `byola-keras embed`: Parquet parts that read as one table.

    OUT/
        embed.json                      what the embeddings are: encoder identity,
                                        embedding size, frames or not, input columns
        clips/part-[TAG-]NNNNN.parquet  one row per file: path, the manifest's
                                        columns, duration_s, file_size,
                                        file_mtime_ns, embedding (float32[d])
        frames/part-[TAG-]NNNNN.parquet (with --frames) one row per frame: path,
                                        the manifest's columns, frame, time_s,
                                        embedding (float32[d])
        failed[-TAG].csv                files skipped by the last run: path, reason
        .locks/                         a lock per shard and one for rewrites

`clips/` and `frames/` are each a Parquet dataset: pandas, polars, DuckDB,
Spark and pyarrow read a folder of parts as one table. TAG is `sIofN` for
`--shard I/N` (nothing for one process), so shards never write the same file.

A part is committed by writing its frames file (if any) and then its clips
file, each under a hidden temporary name, fsynced and renamed into place
(`_files.atomic_write`; readers skip names starting with "."). The clips file
is the commit: a frames file without one is the leftover of a killed commit
and is removed by the next run of its shard, whose files are then embedded
again. Parts are never appended to; a part is rewritten (atomically, under
the rewrite lock) only to drop the rows of files that changed or left the
input, before those files are embedded again.
"""

import csv
import io
import os
import re
import shutil
import signal

import numpy as np

from byola_keras import _files

FORMAT = "byola-keras-embeddings"
VERSION = 1
INFO_FILE = "embed.json"
CLIPS_DIR = "clips"
FRAMES_DIR = "frames"
LOCKS_DIR = ".locks"
_PART = re.compile(r"^part-(?:(s\d+of\d+)-)?(\d+)\.parquet$")
# Test hook: `embed-part:K` SIGKILLs the process once its K-th part is committed;
# `embed-part:K:frames` once the K-th part's frames file is in place, before its
# clips file (a commit cut in the middle).
KILL_ENV = "BYOLA_TEST_KILL_AT"
# The identity fields a resumed run must match, with how the message calls them.
_IDENTITY = {
    "encoder_id": "encoder (weights and front-end)",
    "embedding_dim": "embedding size",
    "frames": "--frames",
    "columns": "manifest columns",
}


class StoreError(ValueError):
    """OUT cannot take these embeddings (another encoder, other settings, a damaged part)."""


def pyarrow_modules():
    """`(pyarrow, pyarrow.parquet)`, or an ImportError saying how to install them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            'byola-keras embed writes Parquet through pyarrow, which is not installed: '
            'pip install "byola-keras[embed]"'
        ) from None
    return pa, pq


def _kill_point(count, phase):
    want = f"embed-part:{count}" + (":frames" if phase == "frames" else "")
    if os.environ.get(KILL_ENV, "") == want:
        os.kill(os.getpid(), signal.SIGKILL)


def _tag(index, count):
    return "" if count == 1 else f"s{index}of{count}"


def _failed_name(tag):
    return f"failed-{tag}.csv" if tag else "failed.csv"


class EmbeddingStore:
    """The parts of one output folder, as seen by one shard.

    Args:
        out: the output folder.
        shard: `(index, count)` of this process's shard.
    """

    def __init__(self, out, shard=(0, 1)):
        self.out = os.path.abspath(os.fspath(out))
        self.shard = tuple(shard)
        self.tag = _tag(*self.shard)
        self.clips_dir = os.path.join(self.out, CLIPS_DIR)
        self.frames_dir = os.path.join(self.out, FRAMES_DIR)
        self.failed_path = os.path.join(self.out, _failed_name(self.tag))
        self.identity = None
        self.commits = 0
        self._lock = None
        self._next = 0

    # ------------------------------------------------------------------
    # Opening

    def _locks(self):
        return os.path.join(self.out, LOCKS_DIR)

    def _shard_lock(self, tag):
        name = tag or "all"
        return _files.FolderLock(os.path.join(self._locks(), name), what=f"lock of shard {name} of the output")

    def open(self, identity, restart=False):
        """Locks this shard, checks (or writes) `embed.json`, clears leftovers of killed runs.

        Args:
            identity: dict with the keys of `_IDENTITY` (plus any description).
            restart: remove every embedding in OUT first (all shards').

        Raises:
            FolderInUse: another live process runs this shard on OUT.
            StoreError: OUT holds embeddings of another encoder or settings.
        """
        os.makedirs(self._locks(), exist_ok=True)
        self._lock = self._shard_lock(self.tag).acquire()
        try:
            with _files.file_lock(os.path.join(self._locks(), "rewrite")):
                if restart:
                    self._remove_all()
                self._check_identity(identity)
                os.makedirs(self.clips_dir, exist_ok=True)
                if identity["frames"]:
                    os.makedirs(self.frames_dir, exist_ok=True)
                self._remove_leftovers()
        except BaseException:
            self.close()
            raise
        self.identity = identity
        names = self._part_names(self.clips_dir) + self._part_names(self.frames_dir)
        seqs = [int(m.group(2)) for m in map(_PART.match, names) if m and (m.group(1) or "") == self.tag]
        self._next = max(seqs, default=-1) + 1
        return self

    def close(self):
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _remove_all(self):
        info = os.path.join(self.out, INFO_FILE)
        if os.path.exists(info):
            os.remove(info)  # first: a half-removed folder then reads as new
        for folder in (self.clips_dir, self.frames_dir):
            shutil.rmtree(folder, ignore_errors=True)
        for name in os.listdir(self.out):
            if name.startswith("failed") and name.endswith(".csv"):
                os.remove(os.path.join(self.out, name))

    def _check_identity(self, identity):
        path = os.path.join(self.out, INFO_FILE)
        if not os.path.exists(path):
            if self._part_names(self.clips_dir):
                raise StoreError(
                    f"'{self.out}' holds embedding parts but no {INFO_FILE}: it was not written by "
                    "byola-keras embed, or was half removed; use another --out or --restart"
                )
            _files.atomic_write_json(path, {"format": FORMAT, "version": VERSION, **identity})
            return
        try:
            old = _files.read_json(path)
        except (OSError, ValueError) as err:
            raise StoreError(f"cannot read '{path}' ({err}); use another --out or --restart") from None
        if not isinstance(old, dict) or old.get("format") != FORMAT or old.get("version") != VERSION:
            raise StoreError(
                f"'{path}' is not a byola-keras embeddings file of version {VERSION}; "
                "use another --out or --restart"
            )
        differ = [what for key, what in _IDENTITY.items() if old.get(key) != identity[key]]
        if differ:
            was = old.get("encoder_file", "another encoder")
            raise StoreError(
                f"'{self.out}' holds embeddings made with other settings ({', '.join(differ)} differ; "
                f"they were made from {was}); nothing was written. Use another --out, or --restart "
                "to replace them"
            )

    @staticmethod
    def _part_names(folder):
        try:
            return sorted(n for n in os.listdir(folder) if _PART.match(n))
        except FileNotFoundError:
            return []

    def _remove_leftovers(self):
        """Files of killed commits, of every shard that no live process holds:
        hidden (temporary) files and frames files without their clips file."""
        clips = set(self._part_names(self.clips_dir))
        tags = {self.tag}
        for folder in (self.clips_dir, self.frames_dir):
            tags |= {m.group(1) or "" for m in map(_PART.match, self._part_names(folder)) if m}
        for tag in sorted(tags):
            lock = None
            if tag != self.tag:
                try:
                    lock = self._shard_lock(tag).acquire()
                except _files.FolderInUse:
                    continue  # that shard is running: its files in flight are its own
            try:
                self._remove_leftovers_of(tag, clips)
            finally:
                if lock is not None:
                    lock.release()

    def _remove_leftovers_of(self, tag, clips):
        failed = _failed_name(tag)
        for folder in (self.clips_dir, self.frames_dir, self.out):
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                if folder == self.out:
                    stale = name.startswith((failed + ".tmp-", INFO_FILE + ".tmp-"))
                else:
                    match = _PART.match(name.lstrip(".").split(".tmp-")[0])
                    stale = bool(match) and (match.group(1) or "") == tag and (
                        name.startswith(".") or (folder == self.frames_dir and name not in clips)
                    )
                if stale:
                    os.remove(os.path.join(folder, name))

    # ------------------------------------------------------------------
    # Reading what is committed

    def committed(self):
        """`{key: [(part name, file_size, file_mtime_ns), ...]}` of every committed clip row."""
        _, pq = pyarrow_modules()
        rows = {}
        for name in self._part_names(self.clips_dir):
            table = self._read(pq, os.path.join(self.clips_dir, name), ["path", "file_size", "file_mtime_ns"])
            if table is None:
                continue
            columns = table.to_pydict()
            for key, size, mtime in zip(columns["path"], columns["file_size"], columns["file_mtime_ns"]):
                rows.setdefault(key, []).append((name, size, mtime))
        return rows

    @staticmethod
    def _read(pq, path, columns=None):
        try:
            return pq.read_table(path, columns=columns)
        except FileNotFoundError:
            return None  # dropped by another shard's rewrite meanwhile
        except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds
            raise StoreError(
                f"cannot read the part '{path}' ({type(err).__name__}: {err}); remove it (its files "
                "are embedded again) and rerun"
            ) from None

    def drop(self, keys):
        """Removes the rows of `keys` from every part (clips and frames), atomically per file."""
        keys = set(keys)
        if not keys:
            return 0
        pa, pq = pyarrow_modules()
        dropped = 0
        with _files.file_lock(os.path.join(self._locks(), "rewrite")):
            for name in self._part_names(self.clips_dir):
                clips_path = os.path.join(self.clips_dir, name)
                table = self._read(pq, clips_path, ["path"])
                if table is None or not keys.intersection(table.column("path").to_pylist()):
                    continue
                frames_path = os.path.join(self.frames_dir, name)
                # Frames first: a kill in between leaves clip rows to drop again next time.
                for path in ([frames_path] if os.path.exists(frames_path) else []) + [clips_path]:
                    table = self._read(pq, path)
                    if table is None:
                        continue
                    keep = np.array([p not in keys for p in table.column("path").to_pylist()], dtype=bool)
                    if path == clips_path:
                        dropped += int((~keep).sum())
                    if keep.all():
                        continue
                    if not keep.any():
                        os.remove(path)
                    else:
                        self._write(pq, path, table.filter(pa.array(keep)))
        return dropped

    # ------------------------------------------------------------------
    # Writing

    @staticmethod
    def _write(pq, path, table):
        """Atomic write under a hidden name (Parquet readers skip names starting with "."),
        then renamed into place."""
        folder, name = os.path.split(path)
        hidden = os.path.join(folder, "." + name)
        _files.atomic_write(hidden, lambda f: pq.write_table(table, f))
        os.replace(hidden, path)

    def commit(self, clips, frames=None):
        """Writes one part: `frames` (a table, or None) then `clips`; returns its name."""
        _, pq = pyarrow_modules()
        name = f"part-{self.tag + '-' if self.tag else ''}{self._next:05d}.parquet"
        self._next += 1
        self.commits += 1
        if frames is not None and frames.num_rows:
            self._write(pq, os.path.join(self.frames_dir, name), frames)
            _kill_point(self.commits, "frames")
        self._write(pq, os.path.join(self.clips_dir, name), clips)
        _kill_point(self.commits, "clips")
        return name

    def write_failed(self, failed):
        """Writes `[(key, reason)]` to this shard's failed list (removes it when empty)."""
        if not failed:
            if os.path.exists(self.failed_path):
                os.remove(self.failed_path)
            return None
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["path", "reason"])
        writer.writerows(failed)
        _files.atomic_write(self.failed_path, lambda f: f.write(text.getvalue()), mode="w")
        return self.failed_path
