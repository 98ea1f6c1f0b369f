import keras
from keras import ops

from byola_keras import frontend


@keras.saving.register_keras_serializable(package="byola_keras")
class PostNorm(keras.layers.Layer):
    """BYOL-A Post-Normalization: standardize with the current batch's statistics.

    The last block of the augmentation module. Mean and unbiased standard
    deviation per channel over batch, frequency and time (both views together
    when the augmentation module calls it), the standard deviation clamped below
    at float32 epsilon. Computed in float32.

    Input shape:
        `(batch, n_mels, frames, channels)`.

    Output shape:
        Same as the input.

    Args:
        epsilon: lower bound of the standard deviation.
        **kwargs: standard layer arguments.

    Example:

    >>> y = PostNorm()(x, training=True)

    References:
        - [Niizumi et al., BYOL for Audio, IJCNN 2021](https://arxiv.org/abs/2103.06695)
    """

    def __init__(self, epsilon=frontend.LOG_EPS, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)
        self.built = True

    def call(self, inputs, training=False):
        if not training:
            return inputs
        x = ops.cast(inputs, "float32")
        axes = tuple(range(len(x.shape) - 1))
        mean = ops.mean(x, axis=axes, keepdims=True)
        count = ops.cast(ops.size(x) // ops.shape(x)[-1], "float32")
        var = ops.sum(ops.square(x - mean), axis=axes, keepdims=True) / ops.maximum(count - 1.0, 1.0)
        std = ops.maximum(ops.sqrt(var), self.epsilon)
        return ops.cast((x - mean) / std, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
