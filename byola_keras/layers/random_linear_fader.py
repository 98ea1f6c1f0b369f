import keras
from keras import ops


@keras.saving.register_keras_serializable(package="byola_keras")
class RandomLinearFader(keras.layers.Layer):
    """BYOL-A v2 Random Linear Fader: a random linear gain ramp over time.

    Adds `S[t] = a + (b - a) t / (T - 1)` (endpoints included) to every
    frequency bin, with `a, b ~ U(-1, 1) * gain` drawn per sample: a fade-in when
    `a < b`, a fade-out when `a > b`. Works in the log-mel domain.

    Input shape:
        `(batch, n_mels, frames, channels)`.

    Output shape:
        Same as the input.

    Args:
        gain: scale of the end-point gains (1.0 in v2).
        seed: integer seed for the random draws.
        **kwargs: standard layer arguments.

    Example:

    >>> layer = RandomLinearFader(gain=1.0, seed=0)
    >>> y = layer(x, training=True)

    References:
        - [Niizumi et al., BYOL for Audio: Exploring Pre-trained
          General-purpose Audio Representations, TASLP 2023](https://arxiv.org/abs/2204.07402)
    """

    def __init__(self, gain=1.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if float(gain) < 0:
            raise ValueError(f"`gain` must be >= 0; got gain={gain}.")
        self.gain = float(gain)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def draw_params(self, batch_size):
        """Per-sample `(head, tail)` gains, `[B, 2]` float32."""
        return keras.random.uniform(
            (batch_size, 2), -1.0, 1.0, seed=self.seed_generator
        ) * self.gain

    def apply_params(self, inputs, head_tail):
        width = inputs.shape[2]
        head_tail = ops.cast(head_tail, "float32")
        t = ops.arange(width, dtype="float32") / float(max(width - 1, 1))
        head, tail = head_tail[:, 0:1], head_tail[:, 1:2]
        ramp = head + (tail - head) * t[None, :]  # [B, T]
        x = ops.cast(inputs, "float32") + ramp[:, None, :, None]
        return ops.cast(x, self.compute_dtype)

    def call(self, inputs, training=False):
        if not training:
            return inputs
        return self.apply_params(inputs, self.draw_params(ops.shape(inputs)[0]))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "gain": self.gain, "seed": self.seed}
