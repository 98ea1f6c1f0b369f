"""A small test base (like keras-rs's / keras-hub's), kept out of keras.src."""

import os
import tempfile

import keras
import numpy as np


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def assert_config_round_trip(layer):
    """`from_config(get_config())` gives an equal config."""
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert clone.get_config() == config, (clone.get_config(), config)
    return clone


def assert_serialization_round_trip(obj):
    """`serialize_keras_object` / `deserialize_keras_object` give an equal config."""
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(obj))
    assert restored.get_config() == obj.get_config()
    return restored


def save_and_load(model):
    """Save `model` as a `.keras` file and load it back (safe mode)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        return keras.saving.load_model(path, safe_mode=True)


def random_log_mel(batch=4, n_mels=16, frames=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(-5.0, 3.0, (batch, n_mels, frames, 1)).astype("float32")
