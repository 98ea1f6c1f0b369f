import math

import keras
import numpy as np
from keras import ops

from byola_keras import frontend
from byola_keras.layers.log_mel_spectrogram import LogMelSpectrogram


@keras.saving.register_keras_serializable(package="byola_keras")
class ZeroPadToLength(keras.layers.Layer):
    """Zero-pads `[batch, samples]` waveforms at the end to at least `length` samples.

    Longer waveforms pass unchanged. Works with a dynamic number of samples
    (TensorFlow graphs, exports) and with static ones (JAX, PyTorch).

    Args:
        length: the minimum number of samples.
        **kwargs: standard layer arguments; `dtype` defaults to `"float32"`.
    """

    def __init__(self, length, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.length = int(length)
        self.built = True

    def call(self, inputs):
        samples = ops.shape(inputs)[1]
        if isinstance(samples, int):
            short = max(self.length - samples, 0)
        else:
            short = ops.maximum(self.length - samples, 0)
        return ops.pad(inputs, [[0, 0], [0, short]])

    def compute_output_shape(self, input_shape):
        samples = input_shape[1]
        return (input_shape[0], None if samples is None else max(samples, self.length))

    def get_config(self):
        return {**super().get_config(), "length": self.length}


def _check_stats(mean, std):
    for name, value in (("mean", mean), ("std", std)):
        if isinstance(value, bool):
            raise ValueError(f"`{name}` must be a number; got {value!r}.")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"`{name}` must be a number; got {value!r}.") from None
        if not math.isfinite(value):
            raise ValueError(f"`{name}` must be finite; got {value!r}.")
    if not float(std) > 0:
        raise ValueError(f"`std` must be > 0; got {std!r}.")
    return float(mean), float(std)


@keras.saving.register_keras_serializable(package="byola_keras")
class WaveformEncoder(keras.Model):
    """A BYOL-A encoder that takes raw audio: front-end, statistics and encoder in one model.

    `waveform -> zero-pad to min_samples -> LogMelSpectrogram -> (x - mean) / std
    -> encoder`. The front-end (Slaney or HTK mel filters), the scalar
    pre-normalization statistics and the encoder's configuration are all in
    `get_config()`, so one `.keras` file holds everything needed to embed audio.
    Calling the model gives clip embeddings; `serving_model` gives clip and frame
    embeddings; `embed()` takes NumPy clips of any length and sample rate.

    Frames: the encoder pools time by `2 ** num_blocks` (8 for AudioNTT2020, 4
    for AudioNTT2022); output frame `j` covers log-mel frames
    `[8j, 8j + 8)` (v1) and its timestamp is their centre,
    `(8j + 3.5) * 10 ms` (v1) or `(4j + 1.5) * 10 ms` (v2). Trailing log-mel
    frames that do not fill a pool window are dropped. Waveforms shorter than
    `min_samples` (1,120 for v1, 513 for v2) are zero-padded at the end.

    Input shape:
        `(batch, samples)` float32 mono waveforms at 16 kHz, any length.

    Output shape:
        `(batch, d)` clip embeddings (max + mean over time of the frames).

    Args:
        encoder: an `AudioNTT2020` / `AudioNTT2022` (or a functional model on
            `[batch, n_mels, frames, 1]` log-mels with a layer named
            `frame_embeddings`).
        mean: scalar mean of the log-mels the encoder was trained with.
        std: scalar standard deviation of those log-mels.
        htk: HTK-scale mel filters instead of Slaney's (the official weights
            were trained with Slaney's).
        name: model name.
        **kwargs: standard model arguments.

    Example:

    >>> model = WaveformEncoder(AudioNTT2020(d=512), mean=-5.49, std=5.04)
    >>> model(np.zeros((2, 16000), "float32")).shape
    (2, 512)
    >>> clip, frames, timestamps = model.embed(np.zeros(16000, "float32"))
    >>> frames.shape, timestamps[0, :2]
    ((1, 12, 512), array([0.035, 0.115], dtype=float32))
    >>> model.save("encoder.keras")

    References:
        - [Niizumi et al., BYOL for Audio, IJCNN 2021](https://arxiv.org/abs/2103.06695)
        - [Niizumi et al., BYOL for Audio: Exploring Pre-trained
          General-purpose Audio Representations, TASLP 2023](https://arxiv.org/abs/2204.07402)
    """

    sample_rate = frontend.SAMPLE_RATE

    def __init__(self, encoder, mean, std, htk=False, name="waveform_encoder", **kwargs):
        mean, std = _check_stats(mean, std)
        try:
            frame_layer = encoder.get_layer("frame_embeddings")
            input_shape = tuple(encoder.input.shape)
        except (AttributeError, ValueError):
            raise TypeError(
                "`encoder` must be a BYOL-A encoder (AudioNTT2020/AudioNTT2022: a functional "
                "model on [batch, n_mels, frames, 1] log-mels with a 'frame_embeddings' layer); "
                f"got {type(encoder).__name__}."
            ) from None
        if len(input_shape) != 4 or input_shape[1] is None or input_shape[3] != 1:
            raise ValueError(f"The encoder input must be [batch, n_mels, frames, 1]; got {input_shape}.")
        num_blocks = getattr(encoder, "num_blocks", None)
        if num_blocks is None:
            num_blocks = sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in encoder.layers)
        frames_per_embedding = 2 ** int(num_blocks)
        min_samples = max(frontend.N_FFT // 2 + 1, (frames_per_embedding - 1) * frontend.HOP_LENGTH)

        waveform = keras.Input((None,), name="waveform")
        x = ZeroPadToLength(min_samples, name="pad_short")(waveform)
        x = LogMelSpectrogram(n_mels=int(input_shape[1]), htk=htk, name="log_mel")(x)
        x = keras.layers.Rescaling(1.0 / std, offset=-mean / std, dtype="float32", name="normalize")(x)
        both = keras.Model(encoder.input, [encoder.output, frame_layer.output], name="clip_and_frames")
        clip, frames = both(x)
        super().__init__(inputs=waveform, outputs=clip, name=name, **kwargs)
        self.encoder = encoder
        self.mean = mean
        self.std = std
        self.htk = bool(htk)
        self.num_blocks = int(num_blocks)
        self.frames_per_embedding = frames_per_embedding
        self.min_samples = min_samples
        self.embedding_dim = int(encoder.output.shape[-1])
        self._clip_and_frames = (clip, frames)
        self._serving_model = None

    @classmethod
    def from_official(cls, path, mean, std, htk=False, version=None):
        """A `WaveformEncoder` holding the weights of an official BYOL-A `.pth` file.

        Args:
            path: the `.pth` state_dict (read without torch; nothing in it is run).
            mean, std: the log-mel statistics to normalize with.
            htk: HTK mel filters instead of Slaney's.
            version: 1, 2 or None (inferred from the shapes).
        """
        from byola_keras import weights

        return cls(weights.load_official(path, version=version), mean, std, htk=htk)

    @classmethod
    def from_learner(cls, learner, htk=False):
        """The encoder of a `BYOLA` learner with its pre-normalization statistics.

        Args:
            learner: a `BYOLA` model (its `mean`/`std` set or adapted).
            htk: whether the learner's log-mels came from HTK mel filters.
        """
        if learner.mean is None or learner.std is None:
            raise ValueError("The learner has no normalization statistics: call `adapt()` first.")
        return cls(learner.encoder, learner.mean, learner.std, htk=htk)

    @property
    def serving_model(self):
        """A model sharing these weights: waveforms -> `{"embedding": [B, d],
        "frame_embeddings": [B, T', d]}` (what the exports serve)."""
        if self._serving_model is None:
            clip, frames = self._clip_and_frames
            self._serving_model = keras.Model(
                self.input,
                {"embedding": clip, "frame_embeddings": frames},
                name=f"{self.name}_serving",
            )
        return self._serving_model

    def timestamps(self, num_samples):
        """Centre times (seconds) of the output frames of a 16 kHz clip of `num_samples`."""
        count = frontend.num_frames(max(int(num_samples), self.min_samples)) // self.frames_per_embedding
        per = self.frames_per_embedding
        step = frontend.HOP_LENGTH / frontend.SAMPLE_RATE
        return ((np.arange(count) * per + (per - 1) / 2.0) * step).astype(np.float32)

    def embed_batch(self, waveforms, batch_size=16):
        """Clip and frame embeddings of a `[B, samples]` 16 kHz batch, as NumPy float32.

        Runs `serving_model` compiled (`predict_on_batch`), `batch_size` clips at a time.
        """
        from byola_keras import embed

        return embed.embed_batch(self, waveforms, batch_size)

    def embed(self, waveforms, sample_rate=frontend.SAMPLE_RATE, channel_axis=None, batch_size=16):
        """Embed NumPy (or backend) waveforms of any length, channel layout and sample rate.

        See `byola_keras.embed.embed_waveforms`; returns `Embeddings(clip,
        frames, timestamps)` (timestamps in seconds).
        """
        from byola_keras import embed

        return embed.embed_waveforms(self, waveforms, sample_rate, channel_axis, batch_size)

    def get_config(self):
        return {
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "mean": self.mean,
            "std": self.std,
            "htk": self.htk,
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return cls(**config)
