"""The STFT power spectrum of the log-mel front-end, per backend.

`power_spectrum(x, window)` gives `|STFT(x)|^2` of `[B, samples]` float32
waveforms, `[B, frames, n_fft // 2 + 1]`, with centred frames (reflect
padding of `n_fft / 2`), the BYOL-A window, hop and FFT size. On TensorFlow it
is `tf.square(tf.abs(tf.signal.stft(...)))`: the `|rfft|` (`ComplexAbs`) form
that tf2onnx converts to ONNX (it converts no real/imaginary split of an
RFFT). Elsewhere `keras.ops.stft`'s real and imaginary parts are squared.
"""

import keras
from keras import ops

from byola_keras import frontend


def power_spectrum(x, window):
    if keras.backend.backend() == "tensorflow":
        return _tensorflow_power_spectrum(x, window)
    real, imag = ops.stft(
        x,
        sequence_length=frontend.WIN_LENGTH,
        sequence_stride=frontend.HOP_LENGTH,
        fft_length=frontend.N_FFT,
        window=ops.convert_to_tensor(window),
        center=True,
    )
    return ops.square(real) + ops.square(imag)


def _tensorflow_power_spectrum(x, window):
    import tensorflow as tf

    half = frontend.N_FFT // 2
    x = tf.pad(x, [[0, 0], [half, half]], mode="REFLECT")
    window = tf.constant(window)
    spectrum = tf.signal.stft(
        x,
        frame_length=frontend.WIN_LENGTH,
        frame_step=frontend.HOP_LENGTH,
        fft_length=frontend.N_FFT,
        window_fn=lambda length, dtype: window,
        pad_end=False,
    )
    return tf.square(tf.abs(spectrum))
