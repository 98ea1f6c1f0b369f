"""The encoders' dropout layer, with a faster `call` on JAX; chosen by
`dropout_layer()`.

`JaxDropout` is Keras's `Dropout` (same constructor, config, seed generator
and outputs; `isinstance` holds; saved under the class name `Dropout`, as the
conv-block layers of `conv`) whose training-mode mask on JAX comes from
`jax_dropout`: the same mask as Keras's, its random bits computed in one fused
pass where JAX's CPU lowering of `jax.random.bernoulli` loops over memory.
Off JAX, and with a `noise_shape`, it runs the parent's `call`.
"""

import keras

from byola_keras.backend.conv import as_keras_layer

_BACKEND = keras.backend.backend()


@as_keras_layer("byola_keras.jax")
class JaxDropout(keras.layers.Dropout):
    """`Dropout` whose JAX mask is drawn by `byola_keras.backend.jax_dropout`."""

    def call(self, inputs, training=False):
        if _BACKEND != "jax" or self.noise_shape is not None or not (training and self.rate > 0):
            return super().call(inputs, training=training)
        from byola_keras.backend import jax_dropout

        return jax_dropout.dropout(inputs, self.rate, self.seed_generator.next())


def dropout_layer():
    """The `Dropout` class for this backend."""
    return JaxDropout if _BACKEND == "jax" else keras.layers.Dropout
