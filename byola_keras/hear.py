"""The HEAR 2021 common API for BYOL-A encoders (https://hearbenchmark.com).

    from byola_keras import hear
    model = hear.load_model("encoder.keras")        # a WaveformEncoder
    scene = hear.get_scene_embeddings(audio, model)  # audio: [n_sounds, n_samples], 16 kHz
    frames, timestamps = hear.get_timestamp_embeddings(audio, model)

`audio` is a tensor of the Keras backend (or a NumPy array) of 16 kHz mono
float samples in [-1, 1]; the results are float32 tensors of the same backend.
Timestamps are the centres of the embedding frames in **milliseconds**: every
80 ms for v1 (first at 35 ms), every 40 ms for v2 (first at 15 ms).

The model object is a `torch.nn.Module` on the torch backend and a `tf.Module`
on the TensorFlow backend (what `hear-validator` requires); on JAX it is a
plain object. Validate with:

    KERAS_BACKEND=torch hear-validator byola_keras.hear --model encoder.keras
"""

import functools

import keras
from keras import ops

from byola_keras import embed, frontend

__all__ = ["load_model", "get_scene_embeddings", "get_timestamp_embeddings"]


class _HearModel:
    """Attributes of the HEAR API around a `WaveformEncoder` (mixed into a backend module)."""

    sample_rate = frontend.SAMPLE_RATE

    def __init__(self, model, batch_size):
        super().__init__()
        self.model = model  # registers the weights with torch's `.to(device)`
        self.batch_size = int(batch_size)
        self.scene_embedding_size = int(model.embedding_dim)
        self.timestamp_embedding_size = int(model.embedding_dim)


@functools.lru_cache(maxsize=None)
def _model_class(backend):
    if backend == "torch":
        import torch

        bases = (_HearModel, torch.nn.Module)
    elif backend == "tensorflow":
        import tensorflow as tf

        bases = (_HearModel, tf.Module)
    else:
        bases = (_HearModel,)
    return type("BYOLAHearModel", bases, {"__module__": __name__})


def load_model(model_file_path="", mean=None, std=None, htk=False, version=None, batch_size=16):
    """Load a BYOL-A `WaveformEncoder` for the HEAR API.

    Args:
        model_file_path: a `.keras` WaveformEncoder (from `byola-keras convert` or
            `byola-keras pretrain`), or an official `.pth` file (then pass
            `mean` and `std`).
        mean, std, htk, version: for `.pth` files (see `WaveformEncoder.from_official`).
        batch_size: clips per encoder call.

    Returns:
        The model object, with `sample_rate` (16000), `scene_embedding_size`
        and `timestamp_embedding_size` (the encoder's `d`).
    """
    if not model_file_path:
        raise ValueError(
            "byola_keras.hear.load_model needs `model_file_path`: a .keras WaveformEncoder "
            "(see `byola-keras convert`), or an official .pth file with mean= and std=."
        )
    model = embed.load_waveform_encoder(model_file_path, mean, std, htk, version)
    return _model_class(keras.backend.backend())(model, batch_size)


def _check(audio, model):
    if not isinstance(model, _HearModel):
        raise TypeError(f"`model` must come from byola_keras.hear.load_model; got {type(model).__name__}.")
    shape = tuple(ops.shape(audio))
    if len(shape) != 2:
        raise ValueError(f"`audio` must be [n_sounds, n_samples] at 16 kHz; got shape {shape}.")
    return shape


def get_scene_embeddings(audio, model):
    """Clip embeddings `[n_sounds, d]` (max + mean over time of the frame embeddings)."""
    _check(audio, model)
    clip, _ = embed.embed_batch(model.model, audio, model.batch_size)
    return ops.convert_to_tensor(clip, "float32")


def get_timestamp_embeddings(audio, model):
    """Frame embeddings `[n_sounds, n_frames, d]` and their centre times `[n_sounds, n_frames]` (ms)."""
    n_sounds, n_samples = _check(audio, model)
    _, frames = embed.embed_batch(model.model, audio, model.batch_size)
    frames = ops.convert_to_tensor(frames, "float32")
    stamps = model.model.timestamps(n_samples) * 1000.0
    stamps = ops.broadcast_to(ops.convert_to_tensor(stamps, "float32"), (n_sounds, stamps.shape[0]))
    return frames, stamps
