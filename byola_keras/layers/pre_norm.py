import keras
import numpy as np
from keras import ops

from byola_keras.layers import _stats


@keras.saving.register_keras_serializable(package="byola_keras")
class PreNorm(keras.layers.Layer):
    """BYOL-A Pre-Normalization: `(x - mean) / std` with dataset statistics.

    The first block of the BYOL-A augmentation module. It brings log-mel values
    to zero mean and unit variance so that log-mixup-exp behaves the same
    whatever the recording level (BYOL-A v1, Section III-B; v2 computes the
    scalar statistics once, before training, from about 10,000 clips). The mean
    and standard deviation are non-trainable weights: set them in the
    constructor, or call `adapt()` on an array or a dataset of log-mels, like
    `keras.layers.Normalization`. The same statistics must go with the encoder
    to every downstream use.

    As an augmentation block, the layer is the identity when `training=False`
    (use `keras.layers.Normalization(mean=m, variance=s**2)` to normalize at
    inference).

    Input shape:
        Any shape, typically `(batch, n_mels, frames, 1)`.

    Output shape:
        Same as the input.

    Args:
        mean: scalar mean of the training log-mels, or `None` to `adapt()`.
        std: scalar standard deviation, or `None` to `adapt()`.
        **kwargs: standard layer arguments.

    Example:

    >>> layer = PreNorm()
    >>> layer.adapt(np.random.normal(-5.0, 4.0, (100, 64, 96, 1)))
    >>> y = layer(x, training=True)

    References:
        - [Niizumi et al., BYOL for Audio, IJCNN 2021](https://arxiv.org/abs/2103.06695)
        - [Niizumi et al., BYOL for Audio: Exploring Pre-trained
          General-purpose Audio Representations, TASLP 2023](https://arxiv.org/abs/2204.07402)
    """

    def __init__(self, mean=None, std=None, **kwargs):
        super().__init__(**kwargs)
        if (mean is None) != (std is None):
            raise ValueError(f"Give both `mean` and `std`, or neither; got mean={mean}, std={std}.")
        if std is not None and not float(std) > 0:
            raise ValueError(f"`std` must be positive; got std={std}.")
        self.mean = None if mean is None else float(mean)
        self.std = None if std is None else float(std)
        self.mean_weight = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(0.0 if mean is None else mean),
            trainable=False,
            autocast=False,  # full precision under mixed-precision policies
            name="mean",
        )
        self.std_weight = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(1.0 if std is None else std),
            trainable=False,
            autocast=False,  # full precision under mixed-precision policies
            name="std",
        )
        self.built = True

    def adapt(self, data, steps=None):
        """Compute the scalar mean and std of `data` and store them.

        Args:
            data: a NumPy array or tensor of log-mels, or an iterable of batches
                (a `tf.data.Dataset`, a `keras.utils.PyDataset`, a generator);
                `(x, y)` tuples use `x`.
            steps: for an iterable, stop after this many batches.
        """
        mean, std = _stats.mean_std(data, steps=steps)
        self.set_statistics(mean, std)

    def set_statistics(self, mean, std):
        """Set the normalization statistics (floats)."""
        if not np.isfinite(mean) or not np.isfinite(std) or std <= 0:
            raise ValueError(f"Invalid statistics mean={mean}, std={std}.")
        self.mean = float(mean)
        self.std = float(std)
        self.mean_weight.assign(self.mean)
        self.std_weight.assign(self.std)

    def call(self, inputs, training=False):
        if not training:
            return inputs
        x = ops.cast(inputs, "float32")
        x = (x - self.mean_weight) / self.std_weight
        return ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}

    def load_own_variables(self, store):
        super().load_own_variables(store)
        self.mean = float(ops.convert_to_numpy(self.mean_weight))
        self.std = float(ops.convert_to_numpy(self.std_weight))
