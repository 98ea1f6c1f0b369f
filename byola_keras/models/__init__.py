"""BYOL-A encoders, the waveform-in encoder model and the BYOL learner."""

from byola_keras.models.audio_ntt2020 import AudioNTT2020
from byola_keras.models.audio_ntt2022 import AudioNTT2022
from byola_keras.models.byola import BYOLA
from byola_keras.models.waveform_encoder import WaveformEncoder

__all__ = ["AudioNTT2020", "AudioNTT2022", "BYOLA", "WaveformEncoder"]
