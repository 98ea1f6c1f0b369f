"""PyTorch's default initialisation (the official networks') vs Keras's, per layer type."""

import math

import keras
import numpy as np
import pytest

from byola_keras.models import AudioNTT2020, AudioNTT2022
from byola_keras.models._init import FanInUniform
from byola_keras.models.byola import mlp_head
from tests.testing import assert_serialization_round_trip, to_numpy


def torch_fan_in(kernel_shape):
    """PyTorch's fan-in: `in_features` of a Linear weight (out, in), `C_in * kH * kW`
    of a Conv2d weight (out, in, kH, kW); here from Keras's (in, out) / HWIO shapes."""
    if len(kernel_shape) == 2:
        return kernel_shape[0]
    height, width, in_channels, _ = kernel_shape
    return in_channels * height * width


def assert_fills_uniform_bound(values, bound):
    """All within +-bound, the extremes near it, the spread of U(-bound, bound)."""
    values = np.asarray(values, np.float64).ravel()
    assert np.abs(values).max() <= bound * (1 + 1e-6)
    tail = 1 - 4.0 / values.size ** 0.5 if values.size < 4096 else 0.99
    assert values.max() > tail * bound and values.min() < -tail * bound
    relative = 4.0 / math.sqrt(values.size)  # a few standard errors of the std
    assert abs(values.std() / (bound / math.sqrt(3)) - 1) < max(relative, 0.01)
    assert abs(values.mean()) < bound * max(relative, 0.01)


def dense_and_conv_layers(model):
    return [
        layer for layer in model._flatten_layers()
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))
    ]


ENCODERS = {
    "AudioNTT2020 d512": lambda init: AudioNTT2020(d=512, init=init),
    "AudioNTT2022": lambda init: AudioNTT2022(init=init),
    "projector d512": lambda init: _head(512, init),
    "predictor": lambda init: _head(256, init),
}


def _head(in_dim, init):
    head = mlp_head(4096, 256, "head", in_dim=in_dim, init=init)
    head.build((None, in_dim))
    return head


@pytest.mark.parametrize("name", list(ENCODERS))
def test_torch_init_draws_pytorch_defaults(name):
    keras.utils.set_random_seed(0)
    model = ENCODERS[name]("torch")
    layers = dense_and_conv_layers(model)
    assert len(layers) == {"AudioNTT2020 d512": 5, "AudioNTT2022": 4}.get(name, 2)
    for layer in layers:
        kernel = to_numpy(layer.kernel)
        bound = 1 / math.sqrt(torch_fan_in(kernel.shape))
        assert_fills_uniform_bound(kernel, bound)
        assert_fills_uniform_bound(to_numpy(layer.bias), bound)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            np.testing.assert_array_equal(to_numpy(layer.gamma), 1.0)
            np.testing.assert_array_equal(to_numpy(layer.beta), 0.0)
    # every layer draws its own values
    firsts = [float(to_numpy(layer.kernel).ravel()[0]) for layer in layers]
    assert len(set(firsts)) == len(firsts)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_keras_init_keeps_keras_defaults(name):
    keras.utils.set_random_seed(0)
    for layer in dense_and_conv_layers(ENCODERS[name]("keras")):
        kernel = to_numpy(layer.kernel)
        fan_in = torch_fan_in(kernel.shape)
        fan_out = fan_in // kernel.shape[-2] * kernel.shape[-1]
        assert_fills_uniform_bound(kernel, math.sqrt(6 / (fan_in + fan_out)))  # Glorot
        assert not np.isclose(math.sqrt(6 / (fan_in + fan_out)), 1 / math.sqrt(fan_in), rtol=0.02)
        np.testing.assert_array_equal(to_numpy(layer.bias), 0.0)


def test_fan_in_uniform_serializes_and_checks_its_argument():
    initializer = FanInUniform(576, seed=3)
    restored = assert_serialization_round_trip(initializer)
    assert restored.fan_in == 576 and initializer.get_config() == {"fan_in": 576, "seed": 3}
    np.testing.assert_array_equal(to_numpy(initializer((64,))), to_numpy(restored((64,))))
    with pytest.raises(ValueError, match="fan_in"):
        FanInUniform(0)
    with pytest.raises(ValueError, match="init"):
        AudioNTT2020(d=32, n_mels=16, init="glorot")


def test_encoder_config_keeps_init_and_old_configs_load_as_keras():
    encoder = AudioNTT2020(d=32, n_mels=16, init="keras")
    assert encoder.get_config()["init"] == "keras"
    assert AudioNTT2020.from_config(encoder.get_config()).init == "keras"
    old = {k: v for k, v in AudioNTT2022(d=256 + 32, n_mels=16).get_config().items() if k != "init"}
    assert AudioNTT2022.from_config(old).init == "keras"
