"""Embed waveforms with a BYOL-A encoder in one call.

    extractor = FeatureExtractor.from_pretrained_file("encoder.keras")  # + norm_stats.json
    clip, frames, timestamps = extractor(wave, sample_rate=44100)

The waveform goes through the BYOL-A front-end (`LogMelSpectrogram`), is
normalized with the scalar statistics that belong to the encoder, and the
encoder returns per-frame embeddings and the clip embedding (max + mean over
time of the frames).
"""

import collections
import os

import keras
import numpy as np
from keras import ops

from byola_keras import frontend
from byola_keras.layers import LogMelSpectrogram

__all__ = ["Embeddings", "FeatureExtractor"]

Embeddings = collections.namedtuple("Embeddings", ["clip", "frames", "timestamps"])
Embeddings.__doc__ = """Result of `FeatureExtractor.__call__`.

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


class FeatureExtractor:
    """Waveforms -> BYOL-A clip and frame embeddings, with timestamps.

    Accepts one 1-D waveform, a `[B, samples]` batch, a `[B, samples, channels]`
    or `[B, channels, samples]` batch, or a list of clips of any lengths (each
    1-D, or 2-D multichannel), as NumPy arrays or tensors of the Keras backend,
    at any sample rate (resampled to 16 kHz with `librosa.resample`).
    Multichannel audio is averaged to mono. For a 2-D clip the channel axis is
    the short one (at most 8 channels) unless `channel_axis` says otherwise; a
    2-D array passed on its own is a batch of mono clips `[B, samples]` (the
    HEAR layout) unless `channel_axis` is given.

    Clips are never padded to a common length: they are sorted by length and
    only equal-length clips share a batch, so every result is what the clip
    alone gives. Frames are `samples // 160 + 1` log-mel frames (10 ms hop)
    pooled by 8 (v1) or 4 (v2): output frame `j` covers log-mel frames
    `[8j, 8j + 8)` and its timestamp is their centre, `(8j + 3.5) * 10 ms` (v1)
    or `(4j + 1.5) * 10 ms` (v2); trailing log-mel frames that do not fill a
    pool window are dropped (the clip embedding does not see them either).
    Clips shorter than one output frame (1,120 samples for v1, 513 for v2, at
    16 kHz) are zero-padded at the end to that length.

    Args:
        encoder: an `AudioNTT2020` / `AudioNTT2022` (e.g. from
            `byola_keras.weights.load_official` or `keras.saving.load_model`).
        mean: scalar mean of the log-mels the encoder was trained/evaluated with.
        std: scalar standard deviation of those log-mels.
        htk: use the HTK-scale mel filters (torchaudio's) instead of Slaney's
            (the official weights were pre-trained with Slaney's).
        batch_size: clips per encoder call.

    Example:

    >>> extractor = FeatureExtractor(encoder, mean=-5.49, std=5.04)
    >>> clip, frames, timestamps = extractor(np.zeros(16000, "float32"))
    >>> clip.shape, frames.shape, timestamps.shape
    ((1, 2048), (1, 12, 2048), (1, 12))
    """

    sample_rate = frontend.SAMPLE_RATE

    def __init__(self, encoder, mean, std, htk=False, batch_size=16):
        for name, value in (("mean", mean), ("std", std)):
            if value is None or not np.isfinite(float(value)):
                raise ValueError(f"`{name}` must be a finite number; got {value!r}.")
        if float(std) <= 0:
            raise ValueError(f"`std` must be > 0; got {std!r}.")
        if int(batch_size) < 1:
            raise ValueError(f"`batch_size` must be >= 1; got {batch_size!r}.")
        try:
            frame_layer = encoder.get_layer("frame_embeddings")
            self.num_blocks = int(encoder.num_blocks)
        except (AttributeError, ValueError):
            raise TypeError(
                f"`encoder` must be a BYOL-A AudioNTT2020/AudioNTT2022 model; got {type(encoder).__name__}."
            ) from None
        self.encoder = encoder
        self.mean = float(mean)
        self.std = float(std)
        self.htk = bool(htk)
        self.batch_size = int(batch_size)
        self.embedding_dim = int(encoder.output.shape[-1])
        self.frames_per_embedding = 2**self.num_blocks
        self.hop_seconds = frontend.HOP_LENGTH / frontend.SAMPLE_RATE * self.frames_per_embedding
        n_mels = int(encoder.input.shape[1])
        self._frontend = LogMelSpectrogram(n_mels=n_mels, htk=self.htk, name="log_mel")
        waves = keras.Input((None,), name="waveform")
        lms = self._frontend(waves)
        lms = keras.layers.Rescaling(1.0 / self.std, offset=-self.mean / self.std, name="norm")(lms)
        frames_and_clip = keras.Model(
            encoder.input, [frame_layer.output, encoder.output], name="encoder_frames_and_clip"
        )
        frames, clip = frames_and_clip(lms)
        # One jit-compiled graph per input shape (predict_on_batch): much cheaper than
        # op-by-op eager execution when clip lengths vary.
        self._pipeline = keras.Model(waves, [clip, frames], name="byola_feature_extractor")
        self.min_samples = max(
            frontend.N_FFT // 2 + 1, (self.frames_per_embedding - 1) * frontend.HOP_LENGTH
        )

    @classmethod
    def from_pretrained_file(cls, path, mean=None, std=None, htk=None, version=None, batch_size=16):
        """A feature extractor for a `.keras` encoder or an official `.pth` file.

        `mean`, `std` and the front-end default to `norm_stats.json` in the
        file's folder (written by `byola-keras convert` and `byola-keras pretrain`).

        Args:
            path: `.keras` encoder, or `.pth` official weights (converted on the fly).
            mean, std: normalization statistics; both or neither.
            htk: front-end choice; None takes it from `norm_stats.json` (else Slaney).
            version: for `.pth` files, 1, 2 or None (infer).
            batch_size: clips per encoder call.
        """
        from byola_keras import weights

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        if path.endswith(".keras"):
            import byola_keras.models  # noqa: F401  (registers the encoder classes)

            encoder = keras.saving.load_model(path)
        else:
            encoder = weights.load_official(path, version=version)
        if (mean is None) != (std is None):
            raise ValueError("Give both `mean` and `std`, or neither (to read norm_stats.json).")
        stats_path = os.path.join(os.path.dirname(os.path.abspath(path)), weights.NORM_STATS_FILE)
        if mean is None:
            mean, std, file_htk = weights.read_norm_stats(stats_path)
            htk = file_htk if htk is None else htk
        return cls(encoder, mean, std, htk=bool(htk), batch_size=batch_size)

    def timestamps(self, num_samples):
        """Centre times (seconds) of the output frames of a 16 kHz clip of `num_samples`."""
        n_frames = frontend.num_frames(max(int(num_samples), self.min_samples))
        count = n_frames // self.frames_per_embedding
        per = self.frames_per_embedding
        step = frontend.HOP_LENGTH / frontend.SAMPLE_RATE
        return ((np.arange(count) * per + (per - 1) / 2.0) * step).astype(np.float32)

    def embed_batch(self, audio):
        """Embed a `[B, samples]` 16 kHz batch (NumPy array or backend tensor).

        Returns NumPy float32 `(clip [B, d], frames [B, T', d])`, computed in
        batches of `batch_size`. Clips shorter than `min_samples` are zero-padded.
        """
        audio = np.asarray(_to_numpy(audio, "audio"), np.float32)
        if audio.ndim != 2:
            raise ValueError(f"`audio` must be [batch, samples]; got shape {audio.shape}.")
        if audio.shape[1] < self.min_samples:
            audio = np.pad(audio, [(0, 0), (0, self.min_samples - audio.shape[1])])
        clips, frames = [], []
        for start in range(0, audio.shape[0], self.batch_size):
            clip, frame = self._pipeline.predict_on_batch(audio[start : start + self.batch_size])
            clips.append(np.asarray(clip, np.float32))
            frames.append(np.asarray(frame, np.float32))
        return np.concatenate(clips, axis=0), np.concatenate(frames, axis=0)

    def __call__(self, waveforms, sample_rate=frontend.SAMPLE_RATE, channel_axis=None):
        """Embed waveforms.

        Args:
            waveforms: a 1-D wave; a `[B, samples]` batch; a `[B, samples, channels]`
                / `[B, channels, samples]` batch; or a list of 1-D / 2-D clips of
                any lengths. NumPy arrays or backend tensors, float in [-1, 1].
            sample_rate: their sampling rate in Hz (resampled to 16 kHz).
            channel_axis: where the channels are, for multichannel input (see
                the class docstring); None infers it.

        Returns:
            `Embeddings(clip, frames, timestamps)` of NumPy float32 arrays:
            `clip [B, d]`, `frames [B, T', d]`, `timestamps [B, T']` in seconds
            (lists per clip for `frames`/`timestamps` when lengths differ).
        """
        if isinstance(sample_rate, bool) or not np.isscalar(sample_rate) or not sample_rate > 0:
            raise ValueError(f"`sample_rate` must be a positive number; got {sample_rate!r}.")
        clips = _split_clips(waveforms, channel_axis)
        if sample_rate != self.sample_rate:
            import librosa

            clips = [
                librosa.resample(c, orig_sr=float(sample_rate), target_sr=float(self.sample_rate))
                .astype(np.float32)
                for c in clips
            ]
        lengths = [max(c.shape[0], self.min_samples) for c in clips]
        order = sorted(range(len(clips)), key=lambda i: lengths[i])
        clip_out = [None] * len(clips)
        frame_out = [None] * len(clips)
        start = 0
        while start < len(order):
            stop = start + 1
            while (
                stop < len(order)
                and stop - start < self.batch_size
                and lengths[order[stop]] == lengths[order[start]]
            ):
                stop += 1
            group = order[start:stop]
            batch = np.zeros((len(group), lengths[group[0]]), np.float32)
            for row, index in enumerate(group):
                batch[row, : clips[index].shape[0]] = clips[index]
            clip_emb, frame_emb = self.embed_batch(batch)
            for row, index in enumerate(group):
                clip_out[index] = clip_emb[row]
                frame_out[index] = frame_emb[row]
            start = stop
        clip = np.stack(clip_out).astype(np.float32)
        stamps = [self.timestamps(n) for n in lengths]
        if len(set(lengths)) == 1:
            return Embeddings(clip, np.stack(frame_out), np.stack(stamps))
        return Embeddings(clip, frame_out, stamps)
