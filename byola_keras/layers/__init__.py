"""BYOL-A Keras layers: the front-end and the augmentation blocks."""

from byola_keras.layers.augmentation_module import AugmentationModule
from byola_keras.layers.log_mel_spectrogram import LogMelSpectrogram
from byola_keras.layers.log_mixup_exp import LogMixupExp
from byola_keras.layers.post_norm import PostNorm
from byola_keras.layers.pre_norm import PreNorm
from byola_keras.layers.random_linear_fader import RandomLinearFader
from byola_keras.layers.random_resize_crop import RandomResizeCrop

__all__ = [
    "AugmentationModule",
    "LogMelSpectrogram",
    "LogMixupExp",
    "PostNorm",
    "PreNorm",
    "RandomLinearFader",
    "RandomResizeCrop",
]
