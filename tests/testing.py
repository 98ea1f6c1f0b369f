"""A small test base for byola-keras layers and models (like keras-rs's and
keras-hub's), kept out of `keras.src`.

`TestCase.run_layer_test(make, x)` checks what every layer promises: the
output shape, the config round trip, a `.keras` round trip that computes the
same outputs, and a jit-compiled one-step `fit()` through the layer. The
helpers are also usable one by one.
"""

import os
import sys
import tempfile

import keras
import numpy as np

SEED_STATE = "seed_generator_state"


def pretrain_command(out, audio_dir, epochs, steps_per_epoch, extra=()):
    """`byola-keras pretrain` argv of a small run on this process's backend:
    dim 64, batch 4, memory 16, a checkpoint every 2 steps, quiet."""
    return [
        sys.executable, "-m", "byola_keras.cli", "pretrain", str(audio_dir), "--out", str(out),
        "--epochs", str(epochs), "--batch-size", "4", "--steps-per-epoch", str(steps_per_epoch), "--dim", "64",
        "--memory-size", "16", "--checkpoint-every", "2", "--backend", keras.backend.backend(),
        "--workers", "1", "--verbose", "0", *extra,
    ]


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


def _merged(outputs):
    """One tensor from a layer's outputs (several views are stacked on channels)."""
    if isinstance(outputs, (list, tuple)):
        return keras.layers.Concatenate(axis=-1)(list(outputs))
    return outputs


def _merged_value(outputs):
    if isinstance(outputs, (list, tuple)):
        return np.concatenate([to_numpy(o) for o in outputs], axis=-1)
    return to_numpy(outputs)


class TestCase:
    """Base class for layer and model tests; pytest collects `Test*` subclasses."""

    def functional_model(self, layer, x):
        """`keras.Model` of `Input(x.shape[1:]) -> layer`, several outputs merged."""
        inputs = keras.Input(x.shape[1:], dtype="float32")
        return keras.Model(inputs, _merged(layer(inputs)))

    def assert_config_round_trip(self, layer):
        assert_serialization_round_trip(layer)
        return assert_config_round_trip(layer)

    def assert_keras_round_trip(self, layer, x, atol=1e-6):
        """Saves a model around `layer` (after one training call, so that its
        state has moved) as `.keras`, loads it, and checks that the loaded
        model holds the same variables and computes the same outputs: in
        inference, and in training given the same random state (seed
        generator states are not part of a saved model, so it is copied)."""
        model = self.functional_model(layer, x)
        model(x, training=True)
        loaded = save_and_load(model)
        assert [type(l) for l in loaded.layers] == [type(l) for l in model.layers]
        assert len(loaded.variables) == len(model.variables)
        for original, restored in zip(model.variables, loaded.variables):
            if SEED_STATE in original.path:
                restored.assign(original)
                continue
            np.testing.assert_array_equal(to_numpy(restored), to_numpy(original), err_msg=original.path)
        np.testing.assert_allclose(
            _merged_value(loaded(x, training=False)), _merged_value(model(x, training=False)), atol=atol
        )
        np.testing.assert_allclose(
            _merged_value(loaded(x, training=True)), _merged_value(model(x, training=True)), atol=atol
        )
        return loaded

    def assert_jitted_fit_step(self, layer, x, state=()):
        """One compiled `fit()` step of `Input -> layer -> Flatten -> Dense(1)`.

        The loss must be finite, the dense weights must move, and each
        non-trainable variable of `layer` named in `state` must change (a state
        update inside `call` that the compiled step drops would leave it).
        """
        inputs = keras.Input(x.shape[1:], dtype="float32")
        hidden = keras.layers.Flatten()(_merged(layer(inputs)))
        head = keras.layers.Dense(1, kernel_initializer="ones")
        model = keras.Model(inputs, head(hidden))
        model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse", jit_compile="auto")
        before_head = to_numpy(head.kernel).copy()
        before_state = {v.name: to_numpy(v).copy() for v in layer.non_trainable_variables}
        history = model.fit(x, np.zeros((len(x), 1), "float32"), batch_size=len(x), epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][-1]), history.history
        assert not np.array_equal(to_numpy(head.kernel), before_head), "the optimizer step changed nothing"
        after_state = {v.name: to_numpy(v) for v in layer.non_trainable_variables}
        for name in state:
            assert not np.array_equal(after_state[name], before_state[name]), f"{name} not updated in fit()"
        return model

    def run_layer_test(self, make, x, expected_shape=None, fit_state=(), atol=1e-6):
        """All of the above for a fresh `make()` layer on input `x`."""
        layer = make()
        y = layer(x, training=True)
        outputs = y if isinstance(y, (list, tuple)) else [y]
        for output in outputs:
            assert tuple(output.shape) == tuple(expected_shape or x.shape), output.shape
            assert np.isfinite(to_numpy(output)).all()
        self.assert_config_round_trip(layer)
        self.assert_keras_round_trip(make(), x, atol=atol)
        self.assert_jitted_fit_step(make(), x, state=fit_state)
        return layer
