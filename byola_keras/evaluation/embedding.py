"""Clip embeddings of a labelled task, computed once and cached on disk.

The encoder is a `WaveformEncoder` (front-end, statistics and encoder in one
model) or a bare log-mel encoder. Each clip is decoded to 16 kHz mono,
optionally cropped or zero-padded to a fixed duration, turned into a log-mel
spectrogram on the host (`byola_keras.frontend.log_mel_numpy`, with the
model's mel filters) once per task and kept in memory, normalized with scalar
statistics `(x - mean) / std` (the model's, given ones, or the train split's)
and passed through the frozen encoder. For a `WaveformEncoder` with its own
statistics this equals `model.embed(clip).clip` (tested), while decoding and
log-mels are shared by every encoder evaluated on the task. Clips with the same number of frames are batched together (a last,
smaller batch of a length is padded to a power of two), so a compiled encoder
traces a few times per distinct length; `bucket_frames` zero-pads the
waveforms so that lengths fall on a coarser grid when a task has many.

With `train_stats=True` (or a bare log-mel encoder and no statistics),
`mean` and `std` are computed over every value of the train split's log-mels
(the protocol used with the official weights).

Embeddings are stored as `.npz` (no pickle) under a key that hashes the encoder
(class, layer configurations and every weight value), the statistics, the
front-end, the manifest's bytes with the size and modification time of each
audio file, the duration and the bucketing, so re-runs are instant and any
change recomputes. Within one process, the log-mels of recently used tasks
stay in memory (`LOG_MEL_MEMORY_BYTES`, 1 GiB), so several encoders evaluated
on the same tasks decode each clip once.
"""

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
import time

import keras
import numpy as np
from keras import ops

from byola_keras import _files
from byola_keras import frontend
from byola_keras.evaluation import tasks as tasks_lib
from byola_keras.models.waveform_encoder import WaveformEncoder

CACHE_VERSION = 2
MIN_SAMPLES = 7 * frontend.HOP_LENGTH  # a bare encoder gets 8 frames at least (the v1 pools)


def default_cache_dir():
    """`$BYOLA_KERAS_CACHE/embeddings`, else `$XDG_CACHE_HOME` or `~/.cache` + `byola-keras/embeddings`."""
    return os.path.join(_files.cache_root(), "embeddings")


@dataclasses.dataclass
class TaskEmbeddings:
    """The embeddings of every clip of a task, in manifest order.

    Attributes:
        task: the `Task`.
        embeddings: `float32 [N, d]`.
        mean, std: the normalization statistics used.
        stats_source: `"given"` or `"train split"`.
        embed_seconds: time the embedding took when it was computed.
        cached: whether this call read them from the cache.
        cache_path: the `.npz` file, or None without a cache.
    """

    task: object
    embeddings: np.ndarray
    mean: float
    std: float
    stats_source: str
    embed_seconds: float
    cached: bool
    cache_path: object = None


def _log(verbose, message):
    if verbose:
        print(message, file=sys.stderr, flush=True)


def _target_samples(num_samples, duration_samples, bucket_frames, min_samples):
    n = num_samples if duration_samples is None else duration_samples
    n = max(n, min_samples)
    if bucket_frames:
        frames = frontend.num_frames(n)
        frames = -(-frames // bucket_frames) * bucket_frames
        n = max(n, (frames - 1) * frontend.HOP_LENGTH)
    return n


def _fit(wave, samples):
    """Crop from the start or zero-pad at the end to `samples`."""
    if wave.shape[0] >= samples:
        return wave[:samples]
    return np.pad(wave, (0, samples - wave.shape[0]))


def _resolve_duration(duration, waves):
    if duration is None:
        return None
    if isinstance(duration, str):
        if duration != "mean":
            raise ValueError(f"`duration` must be seconds, None or 'mean'; got {duration!r}.")
        seconds = float(np.mean([w.shape[0] for w in waves])) / frontend.SAMPLE_RATE
    else:
        seconds = float(duration)
    if not seconds > 0:
        raise ValueError(f"`duration` must be positive; got {duration!r}.")
    return int(round(seconds * frontend.SAMPLE_RATE))


def task_log_mels(task, htk=False, duration=None, bucket_frames=None, verbose=False, min_samples=MIN_SAMPLES):
    """Log-mel spectrograms `[n_mels, frames]` of every clip of a task (a list).

    Args:
        task: a `Task` (see `load_task`).
        htk: HTK-scale filters instead of Slaney (the official weights use Slaney).
        duration: None (whole clips), seconds (crop from the start or zero-pad at
            the end), or `"mean"` (the task's average clip duration).
        bucket_frames: zero-pad each clip so that its frame count is a multiple
            of this (fewer distinct lengths to compile for).
        verbose: print progress to stderr.
        min_samples: zero-pad shorter clips at the end to this many samples.
    """
    mel_matrix = frontend.mel_filterbank(htk=htk)
    waves = []
    for i, path in enumerate(task.paths):
        waves.append(tasks_lib.load_audio(path))
        if verbose and (i + 1) % 500 == 0:
            _log(verbose, f"  {task.name}: decoded {i + 1}/{len(task.paths)} clips")
    duration_samples = _resolve_duration(duration, waves)
    log_mels = []
    with _one_blas_thread():
        for wave in waves:
            wave = _fit(wave, _target_samples(wave.shape[0], duration_samples, bucket_frames, min_samples))
            log_mels.append(frontend.log_mel_numpy(wave, htk=htk, mel_matrix=mel_matrix))
    return log_mels


def _one_blas_thread():
    """One BLAS thread for the many small per-clip matrix products (when threadpoolctl
    is installed): threaded BLAS on a busy machine makes them 10-20 times slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# Log-mels of recent tasks kept in memory (bytes), so that evaluating several
# encoders on the same tasks in one process decodes each task once. 0 disables.
LOG_MEL_MEMORY_BYTES = 1 << 30
_LOG_MEL_MEMO = collections.OrderedDict()


def _memo_log_mels(task, htk, duration, bucket_frames, verbose, min_samples):
    key = (_manifest_digest(task), bool(htk), None if duration is None else str(duration), bucket_frames, min_samples)
    if key in _LOG_MEL_MEMO:
        _LOG_MEL_MEMO.move_to_end(key)
        return _LOG_MEL_MEMO[key]
    _log(verbose, f"{task.name}: computing log-mels of {len(task)} clips")
    log_mels = task_log_mels(task, htk, duration, bucket_frames, verbose, min_samples)
    size = sum(m.nbytes for m in log_mels)
    if size <= LOG_MEL_MEMORY_BYTES:
        _LOG_MEL_MEMO[key] = log_mels
        while sum(sum(m.nbytes for m in v) for v in _LOG_MEL_MEMO.values()) > LOG_MEL_MEMORY_BYTES:
            _LOG_MEL_MEMO.popitem(last=False)
    return log_mels


def log_mel_stats(log_mels):
    """Scalar mean and (population) std over every value of the given log-mels."""
    if not len(log_mels):
        raise ValueError("Cannot compute normalization statistics from no clips.")
    count = sum(m.size for m in log_mels)
    total = sum(float(np.sum(m, dtype="float64")) for m in log_mels)
    mean = total / count
    var = sum(float(np.sum((m.astype("float64") - mean) ** 2)) for m in log_mels) / count
    std = float(np.sqrt(var))
    if not std > 0:
        raise ValueError("The train split's log-mels are constant (std 0); cannot normalize.")
    return float(mean), std


def _predict(encoder, x):
    if isinstance(encoder, keras.Model):
        out = encoder.predict_on_batch(x)
    else:
        out = encoder(x)
    if isinstance(out, (list, tuple, dict)):
        raise ValueError("The encoder must return one `[batch, d]` tensor; it returned several.")
    out = np.asarray(ops.convert_to_numpy(out), dtype="float32")
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(
            f"The encoder must map `[batch, n_mels, frames, 1]` to `[batch, d]`; "
            f"got output shape {out.shape} for input {x.shape}."
        )
    return out


def _padded_size(count, batch_size):
    """Rows to run for `count` clips: `batch_size`, or the next power of two below it."""
    if count >= batch_size:
        return batch_size
    return min(batch_size, 1 << max(0, int(count) - 1).bit_length())


def embed_log_mels(encoder, log_mels, mean, std, batch_size=64):
    """Embed log-mels `[n_mels, frames]` with `encoder`; returns `float32 [N, d]`.

    Clips are grouped by frame count and run `batch_size` at a time; a last,
    smaller batch is zero-padded to the next power of two (then trimmed), so a
    compiled encoder sees few input shapes per distinct length. Padding rows
    do not affect the others (the encoder runs in inference mode).
    """
    if not len(log_mels):
        raise ValueError("No clips to embed.")
    groups = {}
    for i, m in enumerate(log_mels):
        groups.setdefault(m.shape[-1], []).append(i)
    out = [None] * len(log_mels)
    for frames in sorted(groups):
        members = groups[frames]
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            x = np.stack([log_mels[i] for i in chunk]).astype("float32")
            x = ((x - np.float32(mean)) / np.float32(std))[..., None]
            rows = _padded_size(len(chunk), batch_size)
            if rows > len(chunk):
                x = np.concatenate([x, np.zeros((rows - len(chunk),) + x.shape[1:], "float32")])
            y = _predict(encoder, x)
            for row, i in enumerate(chunk):
                out[i] = y[row]
    return np.stack(out).astype("float32")


def _config_without_names(config):
    if isinstance(config, dict):
        return {k: _config_without_names(v) for k, v in config.items() if k != "name"}
    if isinstance(config, (list, tuple)):
        return [_config_without_names(v) for v in config]
    return config


def encoder_fingerprint(encoder):
    """A hex digest of an encoder's architecture and weight values (None if unknown).

    Covers the class, the configuration of each layer (names left out, since
    Keras numbers them per process) and every weight, trainable or not. A
    non-Keras callable may provide its own `cache_key` attribute.
    """
    if not isinstance(encoder, keras.layers.Layer):
        key = getattr(encoder, "cache_key", None)
        return None if key is None else hashlib.sha256(str(key).encode()).hexdigest()
    h = hashlib.sha256()
    h.update(f"{type(encoder).__module__}.{type(encoder).__qualname__}".encode())
    for layer in getattr(encoder, "layers", []):
        h.update(f"|{type(layer).__qualname__}".encode())
        try:
            config = json.dumps(_config_without_names(layer.get_config()), sort_keys=True, default=str)
        except Exception:  # noqa: BLE001 - a layer without a usable config
            config = ""
        h.update(config.encode())
    for value in encoder.get_weights():
        value = np.ascontiguousarray(value)
        h.update(f"|{value.dtype.str}{value.shape}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _manifest_digest(task):
    h = hashlib.sha256()
    with open(task.manifest, "rb") as f:
        h.update(f.read())
    h.update(os.path.dirname(task.manifest).encode())
    for path in task.paths:
        try:
            stat = os.stat(path)
            h.update(f"|{stat.st_size}:{stat.st_mtime_ns}".encode())
        except OSError:
            h.update(b"|missing")
    return h.hexdigest()


def cache_key(encoder_digest, task, mean, std, htk, duration, bucket_frames, min_samples=MIN_SAMPLES):
    """The cache key (hex) for one encoder and task under these settings."""
    material = {
        "version": CACHE_VERSION,
        "encoder": encoder_digest,
        "stats": "train" if mean is None else [repr(float(mean)), repr(float(std))],
        "frontend": {
            "sample_rate": frontend.SAMPLE_RATE,
            "n_fft": frontend.N_FFT,
            "hop": frontend.HOP_LENGTH,
            "n_mels": frontend.N_MELS,
            "f_min": frontend.F_MIN,
            "f_max": frontend.F_MAX,
            "log_eps": frontend.LOG_EPS,
            "htk": bool(htk),
            "min_samples": int(min_samples),
        },
        "manifest": _manifest_digest(task),
        "duration": None if duration is None else str(duration),
        "bucket_frames": bucket_frames,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _cache_path(cache_dir, task, key):
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", task.name)[:64] or "task"
    return os.path.join(cache_dir, f"{safe}-{key[:24]}.npz")


def _read_cache(path, key, num_clips):
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key or data["embeddings"].shape[0] != num_clips:
                return None
            return (
                data["embeddings"].astype("float32"),
                float(data["mean"]),
                float(data["std"]),
                float(data["seconds"]),
            )
    except (OSError, KeyError, ValueError):
        return None


def _write_cache(path, key, embeddings, mean, std, seconds):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path[:-4]}.tmp{os.getpid()}.npz"
    np.savez(
        tmp,
        key=np.asarray(key),
        embeddings=embeddings,
        mean=np.float64(mean),
        std=np.float64(std),
        seconds=np.float64(seconds),
    )
    os.replace(tmp, path)


def embed_task(
    encoder,
    task,
    mean=None,
    std=None,
    htk=False,
    duration=None,
    bucket_frames=None,
    batch_size=64,
    cache_dir=None,
    verbose=False,
    train_stats=False,
):
    """Embed every clip of a task with a frozen encoder, using the disk cache.

    Args:
        encoder: a `WaveformEncoder` (its front-end and statistics are used),
            or a Keras model (or callable) mapping normalized log-mel
            `[B, 64, frames, 1]` to `[B, d]`.
        task: a `Task` or the path of its manifest.
        mean, std: normalization statistics overriding the model's; both None
            for the model's (a bare encoder: the task's train split).
        htk: HTK-scale mel filters instead of Slaney, for a bare encoder.
        duration: None (whole clips), seconds (crop / zero-pad) or `"mean"`.
        bucket_frames: pad frame counts up to multiples of this.
        batch_size: clips per encoder call.
        cache_dir: folder for `.npz` embeddings; None for `default_cache_dir()`,
            False to disable caching.
        verbose: print progress to stderr.
        train_stats: compute the statistics from the task's train split even
            when the model has its own.

    Returns:
        A `TaskEmbeddings`.
    """
    min_samples = MIN_SAMPLES
    if isinstance(encoder, WaveformEncoder):
        htk, min_samples = encoder.htk, encoder.min_samples
        if mean is None and not train_stats:
            mean, std = encoder.mean, encoder.std
        encoder = encoder.encoder
    elif train_stats:
        mean = std = None
    if not isinstance(task, tasks_lib.Task):
        task = tasks_lib.load_task(task)
    if (mean is None) != (std is None):
        raise ValueError("Give both `mean` and `std`, or neither (computed from the train split).")
    if std is not None and not float(std) > 0:
        raise ValueError(f"`std` must be positive; got {std!r}.")
    if bucket_frames is not None and int(bucket_frames) < 1:
        raise ValueError(f"`bucket_frames` must be a positive integer; got {bucket_frames!r}.")
    if int(batch_size) < 1:
        raise ValueError(f"`batch_size` must be a positive integer; got {batch_size!r}.")
    if cache_dir is None:
        cache_dir = default_cache_dir()
    path = key = None
    if cache_dir is not False:
        digest = encoder_fingerprint(encoder)
        if digest is not None:
            key = cache_key(digest, task, mean, std, htk, duration, bucket_frames, min_samples)
            path = _cache_path(os.fspath(cache_dir), task, key)
            hit = _read_cache(path, key, len(task)) if os.path.isfile(path) else None
            if hit is not None:
                embeddings, used_mean, used_std, seconds = hit
                _log(verbose, f"{task.name}: embeddings read from cache {path}")
                return TaskEmbeddings(
                    task=task,
                    embeddings=embeddings,
                    mean=used_mean,
                    std=used_std,
                    stats_source="train split" if mean is None else "given",
                    embed_seconds=seconds,
                    cached=True,
                    cache_path=path,
                )
    start = time.perf_counter()
    log_mels = _memo_log_mels(task, htk, duration, bucket_frames, verbose, min_samples)
    if mean is None:
        mean, std = log_mel_stats([log_mels[i] for i in task.indices("train")])
        source = "train split"
    else:
        mean, std, source = float(mean), float(std), "given"
    lengths = len({m.shape[-1] for m in log_mels})
    _log(verbose, f"{task.name}: embedding ({lengths} distinct length(s), mean {mean:.4f}, std {std:.4f})")
    embeddings = embed_log_mels(encoder, log_mels, mean, std, batch_size)
    seconds = time.perf_counter() - start
    if path is not None:
        _write_cache(path, key, embeddings, mean, std, seconds)
    return TaskEmbeddings(
        task=task,
        embeddings=embeddings,
        mean=mean,
        std=std,
        stats_source=source,
        embed_seconds=seconds,
        cached=False,
        cache_path=path,
    )


class _TimeMeanStd(keras.layers.Layer):
    """`[B, F, T, 1]` -> `[B, 2 F]`: mean and std of each bin over time."""

    def call(self, inputs):
        x = ops.squeeze(ops.cast(inputs, "float32"), axis=-1)
        return ops.concatenate([ops.mean(x, axis=2), ops.std(x, axis=2)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2 * input_shape[1])


def log_mel_mean_std_encoder(n_mels=frontend.N_MELS):
    """A weightless baseline "encoder": mean and std of each mel bin over time.

    Maps normalized log-mel `[B, n_mels, frames, 1]` to `[B, 2 n_mels]`. The
    scalar normalization does not matter to a probe that standardizes its
    inputs. This is the plain log-mel baseline of the downstream tasks.
    """
    inputs = keras.Input((n_mels, None, 1), name="log_mel")
    outputs = _TimeMeanStd(name="time_mean_std")(inputs)
    return keras.Model(inputs, outputs, name="log_mel_mean_std")
