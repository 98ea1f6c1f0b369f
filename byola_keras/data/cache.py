"""A sharded on-disk cache of whole-clip log-mel spectrograms.

Pretraining reads a random 96-frame segment of every clip in every epoch.
Decoding and resampling each file every time costs far more than the training
step on a small encoder, so each clip is decoded once, turned into a log-mel
with `frontend.log_mel_numpy` (the same maths as the Keras front-end layer), and
stored on disk:

    cache_dir/
        shard-<build>-00000.npy   frames of many clips, concatenated, [frames, n_mels]
        shard-<build>-00001.npy   (float16 by default; read by byte range)
        clips-<build>.npz         per clip: shard, start, length, source path,
                                  size and modification time of the source file
        skipped.tsv               files that could not be decoded, with the reason
        index.json                settings, clips file, shard list; written last

Shards are stored frames-major (`[frames, n_mels]`) so that each clip, and each
segment of a clip, is one contiguous block on disk, fetched with one positional
read. No shard stays open or mapped between reads, so a corpus of thousands of
shards (AudioSet: about 1,900) reads as fast as one shard; `cache[i]` returns
the usual `[n_mels, frames]`. Every file is written under a temporary name and
renamed into place, and `index.json` is written last: a build killed halfway
leaves the previous index (or none) in force, and the next `build()` removes
the unreferenced files and carries on. The cache grows with its folder: a
`build()` over a changed file list keeps every clip whose file has the same
size and modification time, decodes only new or changed files into new
shards, and drops removed or changed files (their frames become unreferenced
and their shards are deleted once no clip uses them). Other settings
(front-end, dtype, max_seconds) rebuild it from scratch.

Broken audio files are skipped and counted, never fatal, unless none or more
than half of the files decode, which stops the build with a clear error before
any training starts. A file whose log-mel is not finite (samples so large that
the power spectrum overflows float32, e.g. 1e20 or 1e30 in a float WAV) counts
as broken: the encoder's front-end would turn it into the same inf/NaN, and no
rescaling would tell what the audio was meant to be. NaN/inf samples in
otherwise good audio are set to 0 (counted, and the files listed in the index).
"""

import collections
import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import time
import uuid
import warnings
import zipfile
import zlib

import numpy as np

from byola_keras import frontend
from byola_keras._files import atomic_write as _atomic_save
from byola_keras.data.audio import AudioDecodeError, _resample, _SourceReader

CACHE_FORMAT = "byola-keras-logmel-cache"
CACHE_VERSION = 3  # 3: clips whose log-mel is not finite are skipped (older caches may hold them)
INDEX_FILE = "index.json"
CLIPS_PREFIX = "clips-"
SKIPPED_FILE = "skipped.tsv"
# Long clips are turned into log-mels in blocks of this many seconds (whole
# seconds keep block edges on the 10 ms frame grid); never more is decoded at once.
CHUNK_SECONDS = 60
# A shard is closed at this many clips or frames (2**20 frames x 64 bins of
# float16 = 128 MiB), whichever comes first.
CLIPS_PER_SHARD = 1024
MAX_SHARD_FRAMES = 2**20
_DTYPES = ("float16", "float32")


class _IncompleteCache(ValueError):
    pass


class BuildStopped(RuntimeError):
    """`LogMelCache.build` was asked to stop (`should_stop`); the clips decoded
    so far are indexed, and the next `build()` decodes only the rest."""

    def __init__(self, cache_dir, decoded, remaining):
        self.cache_dir, self.decoded, self.remaining = cache_dir, decoded, remaining
        super().__init__(
            f"Decoding stopped: {decoded} clip(s) decoded and kept in '{cache_dir}', "
            f"{remaining} left for the next build."
        )


# ----------------------------------------------------------------------------
# Decoding one clip to a log-mel


def _window_for(reader, max_seconds):
    """Source frame range of the clip: all of it, or a `max_seconds` window.

    The window's start is random but a deterministic function of the file name
    and length, so rebuilding a cache gives the same windows.
    """
    if max_seconds is None:
        return 0, reader.frames
    width = max(1, int(round(max_seconds * reader.sample_rate)))
    if reader.frames <= width:
        return 0, reader.frames
    name = os.path.basename(reader.path).encode("utf-8", "surrogateescape")
    rng = np.random.default_rng([zlib.crc32(name), reader.frames])
    lo = int(rng.integers(0, reader.frames - width + 1))
    return lo, lo + width


def _resampled_length(num_samples, orig_sr, target_sr):
    if orig_sr == target_sr:
        return num_samples
    return int(np.ceil(num_samples * (float(target_sr) / orig_sr)))  # librosa.resample's length


def _resampled_range(reader, lo, hi, s0, s1):
    """Samples [s0, s1) of the 16 kHz version of source frames [lo, hi).

    Reads and resamples only the source around that range (one second of margin
    each side, aligned on whole seconds so the output grid is exact).
    """
    sr, target = reader.sample_rate, frontend.SAMPLE_RATE
    if sr == target:
        seg = reader.read(lo + s0, lo + s1)
        # An MP3 can end a little before its estimated length: silence.
        return np.pad(seg, (0, s1 - s0 - seg.shape[0])) if seg.shape[0] < s1 - s0 else seg
    a_sec = max(0, s0 // target - 1)
    b_sec = -(-s1 // target) + 1
    src_a = lo + a_sec * sr
    src_b = min(hi, lo + b_sec * sr)
    resampled = _resample(reader.read(src_a, src_b), sr, target)
    seg = resampled[s0 - a_sec * target : s1 - a_sec * target]
    if seg.shape[0] < s1 - s0:  # rounding of the output length at the end, or a short MP3
        seg = np.pad(seg, (0, s1 - s0 - seg.shape[0]))
    return seg


def _source_log_mel(reader, lo, hi, mel_matrix, chunk_seconds=None):
    """Log-mel `[n_mels, frames]` of source frames [lo, hi), decoded in blocks.

    Equal to `log_mel_numpy(load_audio(...))` of the same range: each block of
    `chunk_seconds` is computed from its samples plus 640 samples (4 hops, more
    than half a window) on each side, so frames at block edges see exactly the
    samples they would see in one pass; the reflect padding happens only at the
    true ends of the clip.
    """
    chunk_seconds = CHUNK_SECONDS if chunk_seconds is None else int(chunk_seconds)
    if chunk_seconds < 1:
        raise ValueError(f"`chunk_seconds` must be a whole number of seconds >= 1; got {chunk_seconds}.")
    sr, target, hop = reader.sample_rate, frontend.SAMPLE_RATE, frontend.HOP_LENGTH
    if hi - lo <= chunk_seconds * sr:
        wave = reader.read(lo, hi)
        if wave.size == 0:
            raise AudioDecodeError(reader.path, "no audio samples could be decoded")
        return frontend.log_mel_numpy(_resample(wave, sr, target), mel_matrix=mel_matrix)
    total = _resampled_length(hi - lo, sr, target)
    block = chunk_seconds * target
    block_frames = block // hop
    margin = 4 * hop
    frames = frontend.num_frames(total)
    out = np.empty((mel_matrix.shape[0], frames), np.float32)
    for k in range(-(-frames // block_frames)):
        t0, t1 = k * block_frames, min((k + 1) * block_frames, frames)
        s0 = max(0, k * block - margin)
        s1 = min(total, (k + 1) * block + margin)
        seg = _resampled_range(reader, lo, hi, s0, s1)
        log_mel = frontend.log_mel_numpy(seg, mel_matrix=mel_matrix)
        out[:, t0:t1] = log_mel[:, t0 - s0 // hop : t1 - s0 // hop]
    return out


def clip_log_mel(path, htk=False, max_seconds=None, mel_matrix=None, chunk_seconds=None):
    """Log-mel `[n_mels, frames]` float32 of a whole audio file, decoded in blocks.

    What `LogMelCache` stores for each clip: `frontend.log_mel_numpy` of the
    16 kHz mono waveform, computed `CHUNK_SECONDS` at a time so that an hour-long
    file never sits in memory as audio; with `max_seconds`, only a
    deterministic-random window of that length is decoded.

    Returns:
        `(log_mel, nonfinite)`: the log-mel and the number of NaN/inf sample
        values that were replaced by 0.

    Raises:
        AudioDecodeError: the file cannot be decoded.
    """
    if mel_matrix is None:
        mel_matrix = frontend.mel_filterbank(htk=htk)
    with _SourceReader(path) as reader:
        lo, hi = _window_for(reader, max_seconds)
        log_mel = _source_log_mel(reader, lo, hi, mel_matrix, chunk_seconds)
        return log_mel, reader.nonfinite


# ----------------------------------------------------------------------------
# Writing




class _ShardWriter:
    def __init__(self, cache_dir, build_id, dtype, clips_per_shard, max_frames, first_shard=0):
        self.first_shard = first_shard
        self.cache_dir = cache_dir
        self.build_id = build_id
        self.dtype = np.dtype(dtype)
        self.clips_per_shard = clips_per_shard
        self.max_frames = max_frames
        self.pending = []
        self.pending_frames = 0
        self.shards = []  # (file name, frames)
        self.clip_shard, self.clip_start, self.clip_length, self.paths = [], [], [], []

    def add(self, path, log_mel):
        frames = log_mel.shape[1]
        self.clip_shard.append(self.first_shard + len(self.shards))
        self.clip_start.append(self.pending_frames)
        self.clip_length.append(frames)
        self.paths.append(path)
        self.pending.append(np.ascontiguousarray(log_mel.T, dtype=self.dtype))
        self.pending_frames += frames
        if len(self.pending) >= self.clips_per_shard or self.pending_frames >= self.max_frames:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        data = np.concatenate(self.pending, axis=0)
        name = f"shard-{self.build_id}-{self.first_shard + len(self.shards):05d}.npy"
        _atomic_save(
            os.path.join(self.cache_dir, name), lambda f: np.save(f, data),
            what="a log-mel cache shard", size=data.nbytes,
        )
        self.shards.append((name, int(data.shape[0])))
        self.pending, self.pending_frames = [], 0


def _is_cache_file(name):
    return (
        name in (INDEX_FILE, SKIPPED_FILE, "clips.npz")
        or (name.startswith(("shard-", CLIPS_PREFIX)) and (".npy" in name or ".npz" in name))
        or (name.split(".tmp-")[0] in (INDEX_FILE, SKIPPED_FILE))
    )


def _remove_unreferenced(cache_dir, keep):
    """Removes shard and clips files (and temporaries) not named in `keep`."""
    for name in os.listdir(cache_dir):
        if name in keep or name in (INDEX_FILE, SKIPPED_FILE):
            continue
        if _is_cache_file(name) or ".tmp-" in name:
            os.remove(os.path.join(cache_dir, name))


def _file_state(path):
    """`(size, mtime_ns)` of a source file, or None if it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return int(stat.st_size), int(stat.st_mtime_ns)


def _clear_cache_dir(cache_dir):
    """Removes this module's files (index first: the folder is then incomplete)."""
    index = os.path.join(cache_dir, INDEX_FILE)
    if os.path.exists(index):
        os.remove(index)
    for name in os.listdir(cache_dir):
        if _is_cache_file(name):
            os.remove(os.path.join(cache_dir, name))


def _fingerprint(paths, states, settings):
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for path, state in zip(paths, states):
        state = "missing" if state is None else f"{state[0]}:{state[1]}"
        digest.update(f"{path}\0{state}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _decode_job(path, htk, max_seconds, mel_matrix, dtype):
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # checked below
            log_mel, nonfinite = clip_log_mel(
                path, htk=htk, max_seconds=max_seconds, mel_matrix=mel_matrix
            )
        bad = log_mel.size - np.count_nonzero(np.isfinite(log_mel))
        if bad:
            return AudioDecodeError(path, _nonfinite_log_mel_reason(path, bad, log_mel.size, max_seconds))
        return log_mel.astype(dtype), nonfinite
    except AudioDecodeError as err:
        return err
    except MemoryError:
        return AudioDecodeError(path, "out of memory while decoding (use max_seconds)")
    except Exception as err:  # never fatal: an unexpected failure skips the file
        return AudioDecodeError(path, f"unexpected {type(err).__name__}: {err}")


def _nonfinite_log_mel_reason(path, bad, size, max_seconds):
    """Why a clip's log-mel is not finite, in words (reads the clip again for its peak)."""
    peak = 0.0
    with _SourceReader(path) as reader:
        lo, hi = _window_for(reader, max_seconds)
        block = CHUNK_SECONDS * reader.sample_rate
        for start in range(lo, hi, block):
            wave = reader.read(start, min(hi, start + block))
            if wave.size:
                peak = max(peak, float(np.max(np.abs(wave))))
    return (
        f"its log-mel is not finite ({bad} of {size} values): the power spectrum overflows "
        f"float32 (peak sample {peak:.3g}; audio is expected within about +-1)"
    )


def _decode_in_order(paths, job, workers):
    """Yields `job(path)` results in order, at most a few per worker in flight."""
    if workers <= 1:
        for path in paths:
            yield job(path)
        return
    window = collections.deque()
    executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="byola-decode")
    try:
        it = iter(paths)
        for path in it:
            window.append(executor.submit(job, path))
            if len(window) >= 4 * workers:
                break
        while window:
            result = window.popleft().result()
            for path in it:
                window.append(executor.submit(job, path))
                break
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _single_threaded_blas():
    """One BLAS thread per decoding thread while building (parallelism is per clip).

    The mel projection is a small matrix product: a multi-threaded BLAS run
    from several decoding threads at once oversubscribes the CPU and is many
    times slower. threadpoolctl comes with librosa (through scikit-learn).
    """
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _examples(skipped, count=5):
    return "; ".join(f"'{p}': {r.rstrip('.')}" for p, r in skipped[:count])


# ----------------------------------------------------------------------------
# The cache


def _shard_header(path):
    """`(shape, dtype, data offset in bytes)` of the `.npy` file at `path`."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    if fortran_order:
        raise ValueError("stored in Fortran order")
    return shape, dtype, offset


_PREAD = getattr(os, "pread", None)  # None on Windows
_O_READ = os.O_RDONLY | getattr(os, "O_BINARY", 0)


def _read_range(path, offset, count):
    """`count` bytes of the file at `path` from byte `offset` (short only at its end)."""
    chunks = []
    fd = os.open(path, _O_READ)
    try:
        while count > 0:
            if _PREAD is not None:
                chunk = _PREAD(fd, count, offset)
            else:
                os.lseek(fd, offset, os.SEEK_SET)
                chunk = os.read(fd, count)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            count -= len(chunk)
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class LogMelCache:
    """Whole-clip log-mel spectrograms cached on disk in sharded `.npy` files.

    Build it with `LogMelCache.build(files, cache_dir)`; open an existing one
    with `LogMelCache(cache_dir)`. `cache[i]` is the `[n_mels, frames]` float32
    log-mel of `cache.paths[i]`; `cache.read(i, start, stop)` reads only frames
    `[start, stop)` (what `SegmentDataset` uses); `cache.skipped` lists
    `(path, reason)` of the files that could not be decoded (or whose log-mel
    is not finite), `cache.nonfinite_files` `(path, count)` of those whose
    NaN/inf samples were set to 0.

    Args:
        cache_dir: a folder written by `LogMelCache.build`.

    Raises:
        FileNotFoundError: no complete cache in `cache_dir`.
        ValueError: the cache is damaged (a shard missing or truncated).
    """

    def __init__(self, cache_dir):
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))
        index_path = os.path.join(self.cache_dir, INDEX_FILE)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(
                f"No complete log-mel cache in '{self.cache_dir}' ({INDEX_FILE} is missing); "
                "build one with LogMelCache.build(files, cache_dir)."
            )
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            if index.get("format") != CACHE_FORMAT or index.get("version") != CACHE_VERSION:
                raise _IncompleteCache("unknown cache format or version")
            self.clips_file = index["clips_file"]
            with np.load(os.path.join(self.cache_dir, self.clips_file)) as clips:
                if str(clips["build_id"]) != index["build_id"]:
                    raise _IncompleteCache(f"{self.clips_file} belongs to another build")
                self._shard_of = clips["shard"].astype(np.int64)
                self._start = clips["start"].astype(np.int64)
                self.lengths = clips["length"].astype(np.int64)
                self.paths = [str(p) for p in clips["paths"]]
                self._sizes = clips["size"].astype(np.int64)
                self._mtimes = clips["mtime_ns"].astype(np.int64)
            self.settings = index["settings"]
            self.fingerprint = index["fingerprint"]
            self.n_mels = int(index["n_mels"])
            self.dtype = np.dtype(index["dtype"])
            self.htk = bool(self.settings["htk"])
            self.max_seconds = self.settings["max_seconds"]
            self.nonfinite_files = [(str(p), int(n)) for p, n in index.get("nonfinite_files", [])]
            self.nonfinite_clips = len(self.nonfinite_files)
            self.skipped = [(str(item[0]), str(item[1])) for item in index["skipped"]]
            self._skipped_states = {
                str(item[0]): (None if item[2] is None else (int(item[2]), int(item[3])))
                for item in index["skipped"]
            }
            self.changes = None
            self._shard_files = [name for name, _ in index["shards"]]
            shard_frames = [int(frames) for _, frames in index["shards"]]
            self._shard_frames = shard_frames
        except _IncompleteCache as err:
            raise _IncompleteCache(
                f"Log-mel cache in '{self.cache_dir}' is not usable: {err}."
            ) from None
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            IndexError,
            EOFError,
            zipfile.BadZipFile,
        ) as err:
            raise _IncompleteCache(
                f"Log-mel cache in '{self.cache_dir}' is damaged or half-written "
                f"({type(err).__name__}: {err}); rebuild it with LogMelCache.build."
            ) from None
        num = len(self.paths)
        if not (len(self._shard_of) == len(self._start) == num) or num == 0:
            raise _IncompleteCache(
                f"Log-mel cache in '{self.cache_dir}' has an inconsistent index."
            )
        # Each shard's header is read once here; reads then go straight to
        # the byte range of a clip's frames.
        self._shard_paths, self._shard_offsets = [], []
        for name, frames in zip(self._shard_files, shard_frames):
            path = os.path.join(self.cache_dir, name)
            try:
                shape, dtype, offset = _shard_header(path)
                size = os.path.getsize(path)
            except (OSError, ValueError) as err:
                raise _IncompleteCache(
                    f"Log-mel cache shard '{path}' is missing or truncated ({err}); "
                    "rebuild the cache with LogMelCache.build."
                ) from None
            if shape != (frames, self.n_mels) or dtype != self.dtype:
                raise _IncompleteCache(
                    f"Log-mel cache shard '{path}' has shape {shape} {dtype}, "
                    f"expected {(frames, self.n_mels)} {self.dtype}; rebuild the cache."
                )
            if size < offset + frames * self.n_mels * self.dtype.itemsize:
                raise _IncompleteCache(
                    f"Log-mel cache shard '{path}' is missing or truncated ({size} bytes "
                    f"for {frames} frames); rebuild the cache with LogMelCache.build."
                )
            self._shard_paths.append(path)
            self._shard_offsets.append(offset)
        if np.any(self._shard_of < 0) or np.any(self._shard_of >= len(shard_frames)):
            raise _IncompleteCache(
                f"Log-mel cache in '{self.cache_dir}' refers to shards it does not list."
            )
        ends = self._start + self.lengths
        limits = np.asarray(shard_frames, np.int64)[self._shard_of]
        if np.any(self.lengths < 1) or np.any(self._start < 0) or np.any(ends > limits):
            raise _IncompleteCache(
                f"Log-mel cache in '{self.cache_dir}' has clip ranges outside its shards."
            )

    @classmethod
    def build(
        cls,
        files,
        cache_dir,
        workers=None,
        dtype="float16",
        max_seconds=None,
        htk=False,
        progress=True,
        clips_per_shard=CLIPS_PER_SHARD,
        rebuild=False,
        should_stop=None,
    ):
        """Decodes `files` into a log-mel cache in `cache_dir`, or reuses it.

        Files are decoded in parallel (a thread pool: libsndfile, soxr, FFT and
        BLAS release the GIL). A file that cannot be decoded is skipped and
        recorded in `cache.skipped` and `cache_dir/skipped.tsv`. A complete cache
        with the same settings is updated: clips whose file has the same path,
        size and modification time are kept without decoding, new or changed
        files are decoded and appended, removed ones dropped (and files skipped
        before are tried again only if they changed); `cache.changes` counts
        them (`kept`, `decoded`, `dropped`). With other settings, the content of
        `cache_dir` written by this class is replaced.

        Args:
            files: audio file paths (e.g. from `find_audio_files` or a manifest).
            cache_dir: folder for the cache (created if needed).
            workers: decoding threads; `None` = min(8, CPU count); 0 or 1 decodes
                in the calling thread.
            dtype: storage dtype, "float16" (default, half the disk) or "float32".
            max_seconds: if set, clips longer than this keep only a window of
                this many seconds (random, deterministic per file).
            htk: HTK mel filters instead of Slaney (the official weights use Slaney).
            progress: print progress and a one-line summary.
            clips_per_shard: clips per shard file (a shard also closes at
                2**20 frames).
            rebuild: decode again even if a matching cache exists.
            should_stop: a callable asked after every file; when it returns
                True, the clips decoded so far are indexed and `BuildStopped`
                is raised (a signal handler's flag: a stopped build loses
                nothing, the next one decodes the rest).

        Returns:
            The `LogMelCache`.

        Raises:
            ValueError: no file could be decoded, or more than half could not
                (the message names some and the reasons), or bad arguments.
        """
        paths = _as_path_list(files)
        dtype = _check_dtype(dtype)
        if max_seconds is not None:
            if not (math.isfinite(float(max_seconds)) and float(max_seconds) > 0):
                raise ValueError(
                    f"`max_seconds` must be None or a positive number; got {max_seconds!r}."
                )
            max_seconds = float(max_seconds)
        if workers is None:
            workers = min(8, os.cpu_count() or 1)
        if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
            raise ValueError(f"`workers` must be None or an integer >= 0; got {workers!r}.")
        if (
            isinstance(clips_per_shard, bool)
            or not isinstance(clips_per_shard, (int, np.integer))
            or clips_per_shard < 1
        ):
            raise ValueError(
                f"`clips_per_shard` must be a positive integer; got {clips_per_shard!r}."
            )
        htk = bool(htk)
        cache_dir = os.path.abspath(os.fspath(cache_dir))
        if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
            raise NotADirectoryError(f"`cache_dir` '{cache_dir}' exists and is not a folder.")
        os.makedirs(cache_dir, exist_ok=True)

        settings = {
            "sample_rate": frontend.SAMPLE_RATE,
            "n_fft": frontend.N_FFT,
            "hop_length": frontend.HOP_LENGTH,
            "n_mels": frontend.N_MELS,
            "f_min": frontend.F_MIN,
            "f_max": frontend.F_MAX,
            "htk": htk,
            "dtype": dtype,
            "max_seconds": max_seconds,
        }
        states = [_file_state(p) for p in paths]
        state_of = dict(zip(paths, states))
        fingerprint = _fingerprint(paths, states, settings)
        old = None
        if not rebuild:
            try:
                old = cls(cache_dir)
            except (FileNotFoundError, _IncompleteCache):
                old = None
            if old is not None and old.settings != settings:
                old = None
        if old is not None and old.fingerprint == fingerprint:
            old.changes = {"kept": len(old), "decoded": 0, "dropped": 0}
            if progress:
                print(
                    f"LogMelCache: reusing '{cache_dir}': {len(old)} clips, "
                    f"skipped {len(old.skipped)}.",
                    flush=True,
                )
            return old
        if old is None:
            _clear_cache_dir(cache_dir)
            kept, old_skipped, old_shards = {}, {}, []
        else:
            # What a previous build that died before its index left behind.
            _remove_unreferenced(cache_dir, {old.clips_file, *old._shard_files})
            kept = {
                path: i
                for i, path in enumerate(old.paths)
                if (int(old._sizes[i]), int(old._mtimes[i])) == state_of.get(path, False)
            }
            old_skipped = {
                path: reason
                for path, reason in old.skipped
                if old._skipped_states.get(path) == state_of.get(path, False)
            }
            old_shards = [
                (name, int(frames)) for name, frames in zip(old._shard_files, old._shard_frames)
            ]
        to_decode = [p for p in paths if p not in kept and p not in old_skipped]

        build_id = uuid.uuid4().hex[:12]
        writer = _ShardWriter(
            cache_dir, build_id, dtype, int(clips_per_shard), MAX_SHARD_FRAMES, first_shard=len(old_shards)
        )
        mel_matrix = frontend.mel_filterbank(htk=htk)
        skipped = dict(old_skipped)
        # Files whose NaN/inf samples were set to 0: {path: count}.
        repaired = {} if old is None else {p: n for p, n in old.nonfinite_files if p in kept}
        total = len(paths)
        started = last_report = time.monotonic()

        def job(path):
            return _decode_job(path, htk, max_seconds, mel_matrix, dtype)

        skipped_path = os.path.join(cache_dir, SKIPPED_FILE)
        new_skipped = []
        stopped = False
        with (
            _single_threaded_blas(),
            contextlib.closing(_decode_in_order(to_decode, job, int(workers))) as results,
        ):
            for done, (path, result) in enumerate(zip(to_decode, results), 1):
                if isinstance(result, AudioDecodeError):
                    skipped[path] = result.reason
                    new_skipped.append((path, result.reason))
                    if 2 * len(skipped) > total:
                        break  # more than half failed: stop now, whatever the rest holds
                else:
                    log_mel, nonfinite = result
                    if nonfinite:
                        repaired[path] = int(nonfinite)
                    writer.add(path, log_mel)
                now = time.monotonic()
                if progress and now - last_report >= 10.0:
                    last_report = now
                    print(
                        f"LogMelCache: {done}/{len(to_decode)} files ({len(skipped)} skipped, "
                        f"{now - started:.0f} s)",
                        flush=True,
                    )
                if should_stop is not None and should_stop():
                    stopped = True
                    break
        skipped_list = [(p, skipped[p]) for p in paths if p in skipped]
        _write_skipped(skipped_path, skipped_list)
        if stopped and not writer.clip_shard:
            raise BuildStopped(cache_dir, 0, len(to_decode) - len(new_skipped))
        if 2 * len(skipped) > total or not (writer.clip_shard or kept):
            writer.pending = []
            for name, _ in writer.shards:
                os.remove(os.path.join(cache_dir, name))
            if not (writer.clip_shard or kept) and len(skipped) == total:
                what = f"None of the {total} audio file(s) could be decoded"
            else:
                what = (
                    f"More than half of the {total} audio files could not be decoded "
                    f"(stopped after {len(skipped)} failures)"
                )
            raise ValueError(
                f"{what}; e.g. {_examples(skipped_list)}. Full list: '{skipped_path}'. "
                "Check the folder or manifest: are these readable audio files?"
            )
        writer.flush()

        # Every clip in the order of `paths`: kept ones from the old shards, new ones from the new.
        new_at = {path: j for j, path in enumerate(writer.paths)}
        shard, start, length, sizes, mtimes, clip_paths = [], [], [], [], [], []
        for path, state in zip(paths, states):
            if path in kept:
                i = kept[path]
                shard.append(int(old._shard_of[i]))
                start.append(int(old._start[i]))
                length.append(int(old.lengths[i]))
            elif path in new_at:
                j = new_at[path]
                shard.append(writer.clip_shard[j])
                start.append(writer.clip_start[j])
                length.append(writer.clip_length[j])
            else:
                continue
            clip_paths.append(path)
            sizes.append(-1 if state is None else state[0])
            mtimes.append(-1 if state is None else state[1])
        # Drop shards no clip uses any more, renumbering the rest.
        all_shards = old_shards + writer.shards
        used = sorted(set(shard))
        renumber = {k: n for n, k in enumerate(used)}
        shards = [all_shards[k] for k in used]
        clips = {
            "shard": np.asarray([renumber[k] for k in shard], np.int32),
            "start": np.asarray(start, np.int64),
            "length": np.asarray(length, np.int64),
            "paths": np.asarray(clip_paths, dtype=str),
            "size": np.asarray(sizes, np.int64),
            "mtime_ns": np.asarray(mtimes, np.int64),
            "build_id": np.asarray(build_id),
        }
        clips_file = f"{CLIPS_PREFIX}{build_id}.npz"
        _atomic_save(
            os.path.join(cache_dir, clips_file), lambda f: np.savez(f, **clips),
            what="the log-mel cache's clip table",
        )
        index = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "build_id": build_id,
            "clips_file": clips_file,
            # A stopped build's index never matches: the next build goes on with it.
            "fingerprint": f"incomplete-{build_id}" if stopped else fingerprint,
            "settings": settings,
            "n_mels": frontend.N_MELS,
            "dtype": dtype,
            "num_clips": len(clip_paths),
            "shards": shards,
            "skipped": [
                [p, r, *(state_of[p] if state_of[p] is not None else (None, None))]
                for p, r in skipped_list
            ],
            "nonfinite_files": [[p, repaired[p]] for p in clip_paths if p in repaired],
        }
        index_bytes = json.dumps(index, indent=1).encode("utf-8", "surrogateescape")
        _atomic_save(
            os.path.join(cache_dir, INDEX_FILE), lambda f: f.write(index_bytes),
            what="the log-mel cache index", size=len(index_bytes),
        )
        _remove_unreferenced(cache_dir, {clips_file, *(name for name, _ in shards)})
        if stopped:
            raise BuildStopped(
                cache_dir, len(writer.paths), len(to_decode) - len(writer.paths) - len(new_skipped)
            )
        dropped = 0 if old is None else len(old) - len(kept)
        changes = {"kept": len(kept), "decoded": len(writer.paths), "dropped": dropped}
        if progress:
            if old is None:
                line = f"LogMelCache: decoded {len(writer.paths)} clips, skipped {len(skipped)}"
            else:
                line = (
                    f"LogMelCache: updated: kept {len(kept)} clips, decoded {len(writer.paths)} new "
                    f"or changed, dropped {dropped} removed or changed; skipped {len(skipped)}"
                )
            if new_skipped:
                line += f" (see {skipped_path}; e.g. {_examples(new_skipped, 2)})"
            elif old is None and skipped:
                line += f" (see {skipped_path})"
            new_repaired = [(p, n) for p, n in repaired.items() if p in new_at]
            if new_repaired:
                examples = ", ".join(f"'{p}' ({n})" for p, n in new_repaired[:2])
                line += (
                    f"; {len(new_repaired)} clip(s) had NaN/inf samples, set to 0 "
                    f"(e.g. {examples}; all in {os.path.join(cache_dir, INDEX_FILE)})"
                )
            print(f"{line}; {time.monotonic() - started:.1f} s -> {cache_dir}", flush=True)
        cache = cls(cache_dir)
        cache.changes = changes
        return cache

    def __len__(self):
        return len(self.paths)

    def __repr__(self):
        return (
            f"LogMelCache('{self.cache_dir}', clips={len(self)}, frames={self.num_frames}, "
            f"dtype={self.dtype.name}, htk={self.htk}, skipped={len(self.skipped)})"
        )

    @property
    def num_frames(self):
        """Total frames of all clips."""
        return int(self.lengths.sum())

    def _index(self, i):
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"Clip index must be an integer; got {i!r}.")
        n = len(self.paths)
        if not -n <= i < n:
            raise IndexError(f"Clip index {i} out of range for a cache of {n} clips.")
        return int(i) % n

    def read(self, i, start=0, stop=None):
        """Frames `[start, stop)` of clip `i` as float32 `[n_mels, stop - start]`.

        `stop` is clipped to the clip's length; only those frames are read from disk.
        """
        i = self._index(i)
        length = int(self.lengths[i])
        stop = length if stop is None else min(int(stop), length)
        start = max(0, int(start))
        if start >= stop:
            return np.zeros((self.n_mels, 0), np.float32)
        k = int(self._shard_of[i])
        row = self.n_mels * self.dtype.itemsize
        count = (stop - start) * row
        path = self._shard_paths[k]
        data = _read_range(path, self._shard_offsets[k] + (int(self._start[i]) + start) * row, count)
        if len(data) != count:
            raise ValueError(
                f"Log-mel cache shard '{path}' is truncated: clip {i} ({self.paths[i]}) "
                "is not all there; rebuild the cache with LogMelCache.build."
            )
        block = np.frombuffer(data, dtype=self.dtype).reshape(stop - start, self.n_mels)
        return block.astype(np.float32).T.copy()

    def __getitem__(self, i):
        return self.read(i)


def _write_skipped(path, skipped):
    data = b"".join(
        f"{p}\t{reason}\n".replace("\r", " ").encode("utf-8", "surrogateescape") for p, reason in skipped
    )
    _atomic_save(path, lambda f: f.write(data), what="the log-mel cache's list of skipped files", size=len(data))


def _as_path_list(files):
    if isinstance(files, (str, bytes, os.PathLike)):
        raise TypeError(
            f"`files` must be a list of audio file paths, not a single path ({files!r}); "
            "use find_audio_files(folder) to list a folder."
        )
    paths = []
    for item in files:
        if isinstance(item, dict) and "path" in item:  # a read_manifest row
            item = item["path"]
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"`files` must hold paths (str or path-like); got {item!r}.")
        paths.append(os.path.abspath(os.fspath(item)))
    if not paths:
        raise ValueError("`files` is empty: no audio file to cache.")
    return paths


def _check_dtype(dtype):
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in _DTYPES:
        raise ValueError(f"`dtype` must be one of {_DTYPES}; got {dtype!r}.")
    return name


def compute_norm_stats(cache, max_clips=10000, seed=0):
    """Scalar mean and standard deviation of the log-mels of up to `max_clips` clips.

    The Pre-Normalization statistics of BYOL-A v2 (computed once, before
    training, from about 10,000 clips). The subset is random but fixed by
    `seed`; every finite value of the chosen clips counts, accumulated in
    float64. Non-finite values (a cache built before such clips were skipped)
    are left out with a `RuntimeWarning` naming the clips.

    Args:
        cache: a `LogMelCache` (or any sequence of `[n_mels, frames]` arrays).
        max_clips: at most this many clips.
        seed: seed of the subset.

    Returns:
        `(mean, std)` as Python floats.
    """
    n = len(cache)
    if n == 0:
        raise ValueError("Cannot compute normalisation statistics of an empty cache.")
    if isinstance(max_clips, bool) or not isinstance(max_clips, (int, np.integer)) or max_clips < 1:
        raise ValueError(f"`max_clips` must be a positive integer; got {max_clips!r}.")
    if n <= max_clips:
        chosen = np.arange(n)
    else:
        chosen = np.sort(np.random.default_rng(seed).choice(n, size=int(max_clips), replace=False))
    count, mean, m2 = 0, 0.0, 0.0
    nonfinite = []  # (clip, values)
    for i in chosen:
        x = np.asarray(cache[int(i)], dtype=np.float64)
        finite = np.isfinite(x)
        if not finite.all():
            nonfinite.append((int(i), int(x.size - np.count_nonzero(finite))))
            x = x[finite]
        k = x.size
        if k == 0:
            continue
        x_mean = float(x.mean())
        x_m2 = float(np.square(x - x_mean).sum())
        delta = x_mean - mean
        total = count + k
        mean += delta * k / total
        m2 += x_m2 + delta * delta * count * k / total
        count = total
    if nonfinite:
        paths = getattr(cache, "paths", None)
        names = ", ".join(
            (f"'{paths[i]}'" if paths is not None else f"clip {i}") + f" ({n})" for i, n in nonfinite[:3]
        )
        warnings.warn(
            f"Normalisation statistics: left out {sum(n for _, n in nonfinite)} non-finite log-mel "
            f"value(s) of {len(nonfinite)} clip(s), e.g. {names}; rebuilding the cache skips such clips.",
            RuntimeWarning,
            stacklevel=2,
        )
    if count == 0:
        raise ValueError(
            "Cannot compute normalisation statistics: the chosen clips hold no finite frames."
        )
    std = math.sqrt(m2 / count)
    if not std > 0:
        raise ValueError(
            f"The log-mels are constant (std = 0 over {count} values of {len(chosen)} clips): "
            "cannot normalise; is the corpus silent?"
        )
    return float(mean), float(std)
