"""Embed NumPy waveforms of any length, layout and sample rate with a `WaveformEncoder`.

    model = keras.saving.load_model("encoder.keras")      # a WaveformEncoder
    clip, frames, timestamps = model.embed(wave, sample_rate=44100)

This module turns user input (a clip, a batch, a list of clips of different
lengths, multichannel audio, other sample rates) into `[B, samples]` 16 kHz
batches for `WaveformEncoder.serving_model`, which does the front-end, the
normalization and the encoder. `FeatureExtractor` is the same behind a
callable object.
"""

import collections
import os

import numpy as np
from keras import ops

from byola_keras import frontend

__all__ = ["Embeddings", "FeatureExtractor", "embed_batch", "embed_waveforms"]

Embeddings = collections.namedtuple("Embeddings", ["clip", "frames", "timestamps"])
Embeddings.__doc__ = """Result of `WaveformEncoder.embed` (and `FeatureExtractor.__call__`).

Fields:
    clip: `[B, d]` float32 clip embeddings.
    frames: `[B, T', d]` float32 frame embeddings when all clips have the same
        length, else a list of `[T'_i, d]` arrays (one per clip).
    timestamps: centre time in seconds of each frame, `[B, T']` (or a list of `[T'_i]`).
"""

_MAX_CHANNELS = 8


def _to_numpy(x, what):
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(ops.convert_to_numpy(x))
    except Exception:  # a tensor of another framework, a list of numbers, ...
        try:
            return np.asarray(x)
        except Exception as error:
            raise TypeError(f"{what}: cannot convert {type(x).__name__} to an array.") from error


def _channel_axis(shape, channel_axis, what):
    """Axis (0 or 1) holding the channels of a 2-D clip."""
    if channel_axis is not None:
        if channel_axis not in (0, 1, -1, -2):
            raise ValueError(f"{what}: `channel_axis` must be 0 or 1 for a 2-D clip; got {channel_axis}.")
        return channel_axis % 2
    small = int(np.argmin(shape))
    if shape[0] == shape[1] or shape[small] > _MAX_CHANNELS:
        raise ValueError(
            f"{what}: cannot tell channels from samples in a clip of shape {tuple(shape)}; "
            "pass `channel_axis` (0 for [channels, samples], 1 for [samples, channels])."
        )
    return small


def _mono(clip, channel_axis, what):
    clip = _to_numpy(clip, what)
    if clip.ndim == 2:
        clip = clip.mean(axis=_channel_axis(clip.shape, channel_axis, what))
    if clip.ndim != 1:
        raise ValueError(
            f"{what}: expected a 1-D (mono) or 2-D (multichannel) waveform; got shape {clip.shape}."
        )
    if clip.dtype.kind in "iub":
        raise TypeError(
            f"{what}: got {clip.dtype} samples; pass float audio in [-1, 1] "
            "(e.g. divide int16 PCM by 32768)."
        )
    clip = clip.astype(np.float32, copy=False)
    if clip.shape[0] == 0:
        raise ValueError(f"{what}: empty waveform.")
    if not np.all(np.isfinite(clip)):
        raise ValueError(f"{what}: waveform contains NaN or infinite samples.")
    return clip


def _split_clips(waveforms, channel_axis):
    """Input of `FeatureExtractor.__call__` -> list of mono float32 clips."""
    if isinstance(waveforms, (list, tuple)):
        if not waveforms:
            raise ValueError("`waveforms` is an empty list.")
        return [_mono(w, channel_axis, f"waveforms[{i}]") for i, w in enumerate(waveforms)]
    array = _to_numpy(waveforms, "waveforms")
    if array.ndim == 1:
        return [_mono(array, None, "waveforms")]
    if array.ndim == 2:
        if channel_axis is not None:  # one multichannel clip
            return [_mono(array, channel_axis, "waveforms")]
        if array.shape[1] <= _MAX_CHANNELS:
            raise ValueError(
                f"`waveforms` of shape {array.shape} reads as {array.shape[0]} clips of "
                f"{array.shape[1]} samples. For one multichannel clip pass `channel_axis` "
                "(1 for [samples, channels]) or wrap it in a list."
            )
        return [_mono(w, None, f"waveforms[{i}]") for i, w in enumerate(array)]
    if array.ndim == 3:
        axis = None if channel_axis is None else (channel_axis % 3) - 1
        if axis not in (None, 0, 1):
            raise ValueError("For a [batch, ...] 3-D input, `channel_axis` must be 1 or 2.")
        return [_mono(w, axis, f"waveforms[{i}]") for i, w in enumerate(array)]
    raise ValueError(f"`waveforms` must be 1-, 2- or 3-D; got shape {array.shape}.")


def embed_batch(model, waveforms, batch_size=16):
    """`(clip [B, d], frames [B, T', d])` NumPy float32 of a `[B, samples]` 16 kHz batch.

    Runs `model.serving_model` compiled (`predict_on_batch`), `batch_size` rows at a time.
    """
    audio = np.asarray(_to_numpy(waveforms, "waveforms"), np.float32)
    if audio.ndim != 2:
        raise ValueError(f"`waveforms` must be [batch, samples]; got shape {audio.shape}.")
    if int(batch_size) < 1:
        raise ValueError(f"`batch_size` must be >= 1; got {batch_size!r}.")
    clips, frames = [], []
    for start in range(0, audio.shape[0], int(batch_size)):
        out = model.serving_model.predict_on_batch(audio[start : start + int(batch_size)])
        clips.append(np.asarray(ops.convert_to_numpy(out["embedding"]), np.float32))
        frames.append(np.asarray(ops.convert_to_numpy(out["frame_embeddings"]), np.float32))
    return np.concatenate(clips, axis=0), np.concatenate(frames, axis=0)


def embed_waveforms(model, waveforms, sample_rate=frontend.SAMPLE_RATE, channel_axis=None, batch_size=16):
    """Embed waveforms with a `WaveformEncoder`.

    Accepts one 1-D waveform, a `[B, samples]` batch, a `[B, samples, channels]`
    or `[B, channels, samples]` batch, or a list of clips of any lengths (each
    1-D, or 2-D multichannel), as NumPy arrays or tensors of the Keras backend,
    at any sample rate (resampled to 16 kHz with `librosa.resample`).
    Multichannel audio is averaged to mono. For a 2-D clip the channel axis is
    the short one (at most 8 channels) unless `channel_axis` says otherwise; a
    2-D array passed on its own is a batch of mono clips `[B, samples]` (the
    HEAR layout) unless `channel_axis` is given.

    Clips are never padded to a common length: only equal-length clips share a
    batch, so every result is what the clip alone gives.

    Args:
        model: a `WaveformEncoder`.
        waveforms: see above; float samples in [-1, 1].
        sample_rate: their sampling rate in Hz.
        channel_axis: where the channels are, for multichannel input; None infers it.
        batch_size: clips per encoder call.

    Returns:
        `Embeddings(clip, frames, timestamps)` of NumPy float32 arrays:
        `clip [B, d]`, `frames [B, T', d]`, `timestamps [B, T']` in seconds
        (lists per clip for `frames`/`timestamps` when lengths differ).
    """
    if isinstance(sample_rate, bool) or not np.isscalar(sample_rate) or not sample_rate > 0:
        raise ValueError(f"`sample_rate` must be a positive number; got {sample_rate!r}.")
    clips = _split_clips(waveforms, channel_axis)
    if sample_rate != frontend.SAMPLE_RATE:
        import librosa

        clips = [
            librosa.resample(c, orig_sr=float(sample_rate), target_sr=float(frontend.SAMPLE_RATE))
            .astype(np.float32)
            for c in clips
        ]
    lengths = [c.shape[0] for c in clips]
    clip_out = [None] * len(clips)
    frame_out = [None] * len(clips)
    for length in sorted(set(lengths)):
        group = [i for i, n in enumerate(lengths) if n == length]
        clip_emb, frame_emb = embed_batch(model, np.stack([clips[i] for i in group]), batch_size)
        for row, index in enumerate(group):
            clip_out[index] = clip_emb[row]
            frame_out[index] = frame_emb[row]
    clip = np.stack(clip_out)
    stamps = [model.timestamps(n) for n in lengths]
    if len(set(lengths)) == 1:
        return Embeddings(clip, np.stack(frame_out), np.stack(stamps))
    return Embeddings(clip, frame_out, stamps)


class FeatureExtractor:
    """Waveforms -> BYOL-A clip and frame embeddings, with timestamps (a `WaveformEncoder`).

    `extractor(waveforms, sample_rate)` is `model.embed(waveforms, sample_rate)`
    (see `embed_waveforms` for the accepted layouts).

    Args:
        model: a `WaveformEncoder`, or a log-mel encoder (`AudioNTT2020` /
            `AudioNTT2022`) together with `mean` and `std`.
        mean, std: the log-mel statistics, when `model` is a log-mel encoder.
        htk: HTK mel filters, when `model` is a log-mel encoder.
        batch_size: clips per encoder call.

    Example:

    >>> extractor = FeatureExtractor.from_pretrained_file("encoder.keras")
    >>> clip, frames, timestamps = extractor(np.zeros(16000, "float32"))
    """

    sample_rate = frontend.SAMPLE_RATE

    def __init__(self, model, mean=None, std=None, htk=False, batch_size=16):
        from byola_keras.models import WaveformEncoder

        if not isinstance(model, WaveformEncoder):
            if mean is None or std is None:
                raise ValueError("Give `mean` and `std` with a log-mel encoder (or pass a WaveformEncoder).")
            model = WaveformEncoder(model, mean, std, htk=htk)
        elif mean is not None or std is not None:
            raise ValueError("A WaveformEncoder carries its own `mean` and `std`; do not pass them.")
        if int(batch_size) < 1:
            raise ValueError(f"`batch_size` must be >= 1; got {batch_size!r}.")
        self.model = model
        self.encoder = model.encoder
        self.embedding_dim = model.embedding_dim
        self.batch_size = int(batch_size)

    @classmethod
    def from_pretrained_file(cls, path, mean=None, std=None, htk=False, version=None, batch_size=16):
        """A feature extractor for a `WaveformEncoder` `.keras` file or an official `.pth` file.

        Args:
            path: a `.keras` file written by `byola-keras convert` / `pretrain`
                (or `WaveformEncoder.save`), or an official `.pth` file (then
                give `mean` and `std`).
            mean, std, htk, version: for `.pth` files, see `WaveformEncoder.from_official`.
            batch_size: clips per encoder call.
        """
        return cls(load_waveform_encoder(path, mean, std, htk, version), batch_size=batch_size)

    def timestamps(self, num_samples):
        """Centre times (seconds) of the output frames of a 16 kHz clip of `num_samples`."""
        return self.model.timestamps(num_samples)

    def embed_batch(self, audio):
        """`(clip [B, d], frames [B, T', d])` NumPy float32 of a `[B, samples]` 16 kHz batch."""
        return embed_batch(self.model, audio, self.batch_size)

    def __call__(self, waveforms, sample_rate=frontend.SAMPLE_RATE, channel_axis=None):
        """`Embeddings(clip, frames, timestamps)`; see `embed_waveforms`."""
        return embed_waveforms(self.model, waveforms, sample_rate, channel_axis, self.batch_size)


def load_waveform_encoder(path, mean=None, std=None, htk=False, version=None):
    """A `WaveformEncoder` from a `.keras` file, or from an official `.pth` file with `mean`, `std`.

    Errors name the file: missing, not a WaveformEncoder, or a `.pth` without statistics.
    """
    import keras

    from byola_keras.models import WaveformEncoder

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".keras"):
        if mean is not None or std is not None:
            raise ValueError(f"{path}: a .keras encoder carries its statistics; do not pass mean/std.")
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as error:
            raise ValueError(f"{path}: cannot load the Keras model ({error}).") from error
        if not isinstance(model, WaveformEncoder):
            raise ValueError(
                f"{path}: holds a {type(model).__name__}, not a WaveformEncoder (write one with "
                "`byola-keras convert` or `WaveformEncoder(encoder, mean, std).save(path)`)."
            )
        return model
    if path.endswith((".pth", ".pt")):
        if mean is None or std is None:
            raise ValueError(
                f"{path}: an official .pth file holds no normalization statistics; give mean and std "
                "(or convert it once: byola-keras convert FILE.pth --out encoder.keras --stats MEAN STD)."
            )
        return WaveformEncoder.from_official(path, mean, std, htk=htk, version=version)
    raise ValueError(f"{path}: expected a .keras file or an official .pth file.")
