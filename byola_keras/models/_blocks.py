"""Building blocks shared by the AudioNTT encoders."""

import keras

from byola_keras.backend.conv import conv_block_layers
from byola_keras.backend.dropout import dropout_layer
from byola_keras.models._init import layer_initializers

BN_EPSILON = 1e-5  # PyTorch's BatchNorm2d default; Keras's 1e-3 breaks weight parity
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1


def conv_block(x, index, filters=64, init="torch"):
    """Conv 3x3 (same padding, bias) -> BatchNorm -> ReLU -> MaxPool 2x2.

    The layers are Keras's, or subclasses with a faster `call` on this
    backend (`byola_keras.backend.conv`): same weights, names and outputs. `init`:
    `"torch"` or `"keras"` initialisation (see `_init`)."""
    conv, batch_norm, max_pool = conv_block_layers()
    fan_in = 3 * 3 * int(x.shape[-1])
    x = conv(filters, 3, padding="same", name=f"conv{index}", **layer_initializers(init, fan_in))(x)
    x = batch_norm(axis=-1, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"bn{index}")(x)
    x = keras.layers.ReLU(name=f"relu{index}")(x)
    return max_pool(2, name=f"pool{index}")(x)


def frames_from_maps(x, n_freq, filters=64):
    """`[B, F', T', C]` -> `[B, T', F' * C]` with feature index `f * C + c`."""
    x = keras.layers.Permute((2, 1, 3), name="to_time_major")(x)
    return keras.layers.Reshape((-1, n_freq * filters), name="flatten_frames")(x)


def mlp(x, hidden, out, dropout=0.3, init="torch"):
    """Dense -> ReLU -> Dropout -> Dense -> ReLU, applied per frame."""
    x = keras.layers.Dense(hidden, name="fc1", **layer_initializers(init, int(x.shape[-1])))(x)
    x = keras.layers.ReLU(name="fc1_relu")(x)
    x = dropout_layer()(dropout, name="fc_dropout")(x)
    x = keras.layers.Dense(out, name="fc2", **layer_initializers(init, hidden))(x)
    return keras.layers.ReLU(name="fc2_relu")(x)


def max_mean_pool(frames):
    """Clip embedding: max over time + mean over time (element-wise sum)."""
    mx = keras.layers.GlobalMaxPooling1D(name="time_max")(frames)
    mean = keras.layers.GlobalAveragePooling1D(name="time_mean")(frames)
    return keras.layers.Add(name="embedding")([mx, mean])


class AudioNTTBase(keras.Model):
    """Shared behaviour of the AudioNTT encoders (functional models)."""

    def get_config(self):
        return {
            "d": self.d,
            "n_mels": self.n_mels,
            "dropout": self.dropout,
            "init": self.init,
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        # Configs written before `init` existed describe Keras-initialised encoders.
        return cls(**{"init": "keras", **config})

    @property
    def frame_encoder(self):
        """A model sharing this encoder's weights that returns frame embeddings
        `[B, frames', d]` (before temporal pooling)."""
        if getattr(self, "_frame_encoder", None) is None:
            self._frame_encoder = keras.Model(
                self.input, self.get_layer("frame_embeddings").output, name=f"{self.name}_frames"
            )
        return self._frame_encoder

    @property
    def embedding_dim(self):
        return int(self.output.shape[-1])

    def frames_per_input(self, num_frames):
        """Frames left after the max-pools (each floors odd sizes)."""
        for _ in range(self.num_blocks):
            num_frames //= 2
        return num_frames
