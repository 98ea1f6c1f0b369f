"""The BYOL-A audio front-end constants, shared by the Keras layer and the data pipeline.

16 kHz mono, periodic Hann window of 1,024 samples, hop 160, FFT 1,024, centred frames
(reflect padding), power spectrogram, 64 mel bins over 60-7,800 Hz, then
`log(mel + eps)` with eps the float32 machine epsilon (SPEC.md, "Audio front-end").

The official weights were trained with the Slaney mel scale and Slaney area
normalisation (librosa's default filters); `htk=True` gives the HTK-scale,
unnormalised filters of torchaudio and `keras.layers.MelSpectrogram`.

Everything here is plain NumPy so that data preparation (which runs on the host,
before any backend is involved) and the Keras layer use one definition.
"""

import numpy as np

try:  # scipy's FFT is several times faster than numpy's here (a librosa dependency)
    from scipy import fft as _fft
except ImportError:  # pragma: no cover
    _fft = np.fft

SAMPLE_RATE = 16000
N_FFT = 1024
WIN_LENGTH = 1024
HOP_LENGTH = 160
N_MELS = 64
F_MIN = 60.0
F_MAX = 7800.0
LOG_EPS = float(np.finfo(np.float32).eps)  # 1.1920929e-07
SEGMENT_SAMPLES = 15200  # 0.95 s -> 96 frames
SEGMENT_FRAMES = 96


def hz_to_mel(freq, htk=False):
    """Hz to mel: HTK (2595 log10(1 + f/700)) or Slaney (linear below 1 kHz, log above)."""
    freq = np.asarray(freq, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + freq / 700.0)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    mels = freq / f_sp
    log_region = freq >= min_log_hz
    safe = np.where(log_region, freq, min_log_hz)
    return np.where(log_region, min_log_mel + np.log(safe / min_log_hz) / logstep, mels)


def mel_to_hz(mels, htk=False):
    """Inverse of `hz_to_mel`."""
    mels = np.asarray(mels, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    freqs = f_sp * mels
    log_region = mels >= min_log_mel
    return np.where(log_region, min_log_hz * np.exp(logstep * (mels - min_log_mel)), freqs)


def mel_filterbank(
    sample_rate=SAMPLE_RATE,
    n_fft=N_FFT,
    n_mels=N_MELS,
    f_min=F_MIN,
    f_max=F_MAX,
    htk=False,
):
    """Triangular mel filters as a `[n_mels, n_fft // 2 + 1]` float32 matrix.

    `htk=False` (default): Slaney mel scale with Slaney area normalisation, the
    filters the official BYOL-A weights were trained with. `htk=True`: HTK mel
    scale, peak-normalised triangles (torchaudio's default).
    """
    if not 0.0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(
            f"Need 0 <= f_min < f_max <= sample_rate / 2; got f_min={f_min}, "
            f"f_max={f_max}, sample_rate={sample_rate}."
        )
    n_freqs = n_fft // 2 + 1
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_freqs)
    mel_pts = np.linspace(hz_to_mel(f_min, htk), hz_to_mel(f_max, htk), n_mels + 2)
    hz_pts = mel_to_hz(mel_pts, htk)
    widths = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if not htk:
        weights *= (2.0 / (hz_pts[2 : n_mels + 2] - hz_pts[:n_mels]))[:, None]
    return weights.astype(np.float32)


def hann_window(length=WIN_LENGTH):
    """Periodic Hann window (the STFT convention of librosa and torch)."""
    n = np.arange(length, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)).astype(np.float32)


def num_frames(num_samples, hop_length=HOP_LENGTH):
    """Frames of a centred STFT: 1 + samples // hop (1 s -> 101, 0.95 s -> 96)."""
    return 1 + int(num_samples) // hop_length


def log_mel_numpy(wave, htk=False, mel_matrix=None):
    """Log-mel of one mono 16 kHz waveform on the host, `[n_mels, frames]` float32.

    Same maths as `byola_keras.layers.LogMelSpectrogram`; used by the data pipeline
    to decode and cache whole clips. Clips shorter than `n_fft // 2 + 1` samples are
    zero-padded first (reflect padding needs that many).
    """
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    n = wave.shape[0]
    if n <= N_FFT // 2:
        wave = np.pad(wave, (0, N_FFT // 2 + 1 - n))
    padded = np.pad(wave, (N_FFT // 2, N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
    frames = frames[: num_frames(n)]
    spec = _fft.rfft(frames * hann_window(), n=N_FFT, axis=-1)
    power = (spec.real**2 + spec.imag**2).astype(np.float32)
    fb = mel_filterbank(htk=htk) if mel_matrix is None else mel_matrix
    mel = power @ fb.T
    return np.log(mel + LOG_EPS).T.astype(np.float32)
