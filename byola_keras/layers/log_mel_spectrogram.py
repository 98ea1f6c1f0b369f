import keras
import numpy as np
from keras import ops

from byola_keras import frontend
from byola_keras.backend import spectrum


@keras.saving.register_keras_serializable(package="byola_keras")
class LogMelSpectrogram(keras.layers.Layer):
    """Waveform to BYOL-A log-mel spectrogram, computed with `keras.ops`.

    A centred STFT (periodic Hann window of 1,024 samples, hop 160, reflect
    padding), the power spectrum, a constant mel matrix and `log(mel + eps)`
    with eps = float32 machine epsilon. The default filters are the Slaney-scale,
    area-normalised ones the official BYOL-A weights were trained with;
    `htk=True` gives torchaudio's (and `keras.layers.MelSpectrogram`'s) HTK
    filters, which differ by several nats per bin and are not weight-compatible.
    The log and the matrix product always run in float32.

    Input shape:
        `(batch, samples)` float waveform at `sample_rate`, any length.

    Output shape:
        `(batch, n_mels, frames, 1)` with `frames = 1 + samples // 160`
        (channels-last; 1 s gives 101 frames, 0.95 s gives 96).

    Args:
        sample_rate: sampling rate of the input (16,000 for BYOL-A).
        n_mels: number of mel bins (64).
        f_min: lowest filter edge in Hz (60).
        f_max: highest filter edge in Hz (7,800).
        htk: use HTK-scale, unnormalised filters instead of Slaney.
        **kwargs: standard layer arguments; `dtype` defaults to `"float32"`
            whatever the global policy.

    Example:

    >>> layer = LogMelSpectrogram()
    >>> layer(np.zeros((2, 16000), "float32")).shape
    (2, 64, 101, 1)

    References:
        - [Niizumi et al., BYOL for Audio, IJCNN 2021](https://arxiv.org/abs/2103.06695)
        - [Niizumi et al., BYOL for Audio: Exploring Pre-trained
          General-purpose Audio Representations, TASLP 2023](https://arxiv.org/abs/2204.07402)
    """

    def __init__(
        self,
        sample_rate=frontend.SAMPLE_RATE,
        n_mels=frontend.N_MELS,
        f_min=frontend.F_MIN,
        f_max=frontend.F_MAX,
        htk=False,
        **kwargs,
    ):
        # float32 unless told otherwise: Keras casts a layer's inputs to its
        # compute dtype, and a bfloat16 waveform would lose 8 bits.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.sample_rate = int(sample_rate)
        self.n_mels = int(n_mels)
        self.f_min = float(f_min)
        self.f_max = float(f_max)
        self.htk = bool(htk)
        self._mel_matrix = np.ascontiguousarray(
            frontend.mel_filterbank(
                sample_rate=self.sample_rate,
                n_mels=self.n_mels,
                f_min=self.f_min,
                f_max=self.f_max,
                htk=self.htk,
            ).T
        )  # [n_freqs, n_mels]
        self._window = frontend.hann_window()
        self.built = True

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        power = spectrum.power_spectrum(x, self._window)  # [B, frames, n_freqs]
        mel = ops.matmul(power, ops.convert_to_tensor(self._mel_matrix))
        log_mel = ops.log(mel + frontend.LOG_EPS)  # [B, frames, n_mels]
        out = ops.expand_dims(ops.transpose(log_mel, (0, 2, 1)), -1)
        return ops.cast(out, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        samples = input_shape[-1]
        frames = None if samples is None else frontend.num_frames(samples)
        return (input_shape[0], self.n_mels, frames, 1)

    def get_config(self):
        return {
            **super().get_config(),
            "sample_rate": self.sample_rate,
            "n_mels": self.n_mels,
            "f_min": self.f_min,
            "f_max": self.f_max,
            "htk": self.htk,
        }
