import keras
from keras import ops

from byola_keras import defaults, frontend
from byola_keras.backend import bank as _bank
from byola_keras.backend.replicas import gather_from_replicas


@keras.saving.register_keras_serializable(package="byola_keras")
class LogMixupExp(keras.layers.Layer):
    """BYOL-A mixup in the linear-power domain with a FIFO memory bank.

    Each sample `x` is mixed with a background sample `z` drawn at random from a
    memory bank of earlier (pre-normalized) inputs:
    `x' = log((1 - l) exp(x) + l exp(z) + eps)`, with `l ~ U(0, alpha)` drawn per
    sample. Mixup acts on features only (no labels). After mixing, the incoming
    batch is pushed into the bank (first in, first out). While the bank is empty
    the input passes unchanged.

    The bank is a non-trainable weight written inside `call`, so it lives on the
    device, is updated inside jit-compiled training steps on every backend, and
    is saved with the model. Each step writes only the new rows, in place (no
    copy of the bank per step). Unlike the official code (one bank per
    data-loader worker, filled one sample at a time), the bank is shared by the
    whole batch. Run the layer inside the model, not inside `tf.data`.
    The exp/log maths always runs in float32.

    Input shape:
        `(batch, n_mels, frames, channels)`; `batch <= memory_size`.

    Output shape:
        Same as the input, with `views` times its batch.

    Args:
        alpha: upper bound of the background weight `l` (0.4 in v1, 0.2 in v2).
        memory_size: number of past samples kept in the bank (2,048).
        seed: integer seed for the random draws.
        **kwargs: standard layer arguments.

    Call arguments:
        inputs: the batch to mix.
        training: mix only when `True`; otherwise return `inputs` (repeated
            `views` times).
        views: how many independently mixed copies of each sample to return,
            stacked along the batch (`views * batch` rows: all samples for the
            first view, then the second...). Each sample enters the bank once
            and its `exp` is computed once. The augmentation module asks for 2.

    Example:

    >>> layer = LogMixupExp(alpha=0.4, memory_size=2048, seed=0)
    >>> y = layer(x, training=True)  # passes x; fills the bank
    >>> y = layer(x2, training=True)  # mixes x2 with samples of x

    References:
        - [Niizumi et al., BYOL for Audio, IJCNN 2021](https://arxiv.org/abs/2103.06695)
        - [Niizumi et al., BYOL for Audio: Exploring Pre-trained
          General-purpose Audio Representations, TASLP 2023](https://arxiv.org/abs/2204.07402)
    """

    def __init__(
        self,
        alpha=defaults.VERSION_DEFAULTS["v1"]["alpha"],
        memory_size=defaults.COMMON_DEFAULTS["memory_size"],
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1]; got alpha={alpha}.")
        if int(memory_size) < 1:
            raise ValueError(f"`memory_size` must be >= 1; got memory_size={memory_size}.")
        self.alpha = float(alpha)
        self.memory_size = int(memory_size)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if any(d is None for d in input_shape[1:]):
            raise ValueError(
                "LogMixupExp needs a fixed sample shape for its memory bank; "
                f"got input_shape={input_shape}."
            )
        self.memory = self.add_weight(
            shape=(self.memory_size, *input_shape[1:]),
            initializer="zeros",
            trainable=False,
            autocast=False,  # read in float32 under mixed-precision policies
            name="memory",
        )
        self.memory_filled = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", trainable=False, name="memory_filled"
        )
        self.memory_pointer = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", trainable=False, name="memory_pointer"
        )

    def draw_params(self, batch_size):
        """Per-sample background weights `[B]` and bank indices `[B]` (int32)."""
        # One draw for both (each random-number call is a separate kernel).
        u = keras.random.uniform((2, batch_size), 0.0, 1.0, seed=self.seed_generator, dtype="float32")
        lam, u = u[0] * self.alpha, u[1]
        filled = ops.cast(self.memory_filled, "float32")
        index = ops.cast(ops.floor(u * filled), "int32")
        index = ops.clip(index, 0, ops.maximum(self.memory_filled - 1, 0))
        return lam, index

    @staticmethod
    def mix(x, background, lam, views=1):
        """`log((1 - lam) exp(x) + lam exp(background) + eps)`, lam of shape `[B]`.

        With `views > 1`, `background` and `lam` have `views` times the rows of
        `x`, and `x` is repeated (batch-major, as `concatenate([x] * views)`).
        """
        foreground = ops.exp(ops.cast(x, "float32"))
        if views > 1:
            foreground = ops.concatenate([foreground] * views, axis=0)
        background = ops.cast(background, "float32")
        lam = ops.reshape(ops.cast(lam, "float32"), (-1,) + (1,) * (len(x.shape) - 1))
        return ops.log((1.0 - lam) * foreground + lam * ops.exp(background) + frontend.LOG_EPS)

    def call(self, inputs, training=False, views=1):
        views = int(views)
        if views < 1:
            raise ValueError(f"`views` must be >= 1; got views={views}.")

        def repeated():
            x = ops.cast(inputs, "float32")
            return x if views == 1 else ops.concatenate([x] * views, axis=0)

        if not training:
            return ops.cast(repeated(), self.compute_dtype)
        background = None
        if self.alpha > 0.0:
            lam, index = self.draw_params(ops.shape(inputs)[0] * views)
            background = ops.take(self.memory, index, axis=0)
            # A conditional rather than `where`: it skips the maths while the
            # bank is empty, and its result is computed once instead of being
            # fused into, and recomputed by, every tap of the resize-crop gather
            # that follows under XLA.
            outputs = ops.cond(
                self.memory_filled > 0,
                lambda: self.mix(inputs, background, lam, views),
                repeated,
            )
        else:
            outputs = repeated()
        self._push(inputs, after=background)
        return ops.cast(outputs, self.compute_dtype)

    def _push(self, batch, after=None):
        # Under tf.distribute every replica pushes the global batch, so that the
        # replicas' banks stay identical (a no-op elsewhere).
        batch = gather_from_replicas(batch)
        if batch.shape[0] is not None and batch.shape[0] > self.memory_size:
            batch = batch[-self.memory_size :]  # only the newest fit
        _bank.ring_write(self.memory, self.memory_pointer, ops.cast(batch, self.memory.dtype), after)
        n = ops.cast(ops.shape(batch)[0], "int32")
        self.memory_pointer.assign(ops.mod(self.memory_pointer + n, self.memory_size))
        self.memory_filled.assign(ops.minimum(self.memory_filled + n, self.memory_size))

    def reset_memory(self):
        """Empty the bank."""
        self.memory.assign(ops.zeros_like(self.memory))
        self.memory_filled.assign(0)
        self.memory_pointer.assign(0)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_output_spec(self, inputs, training=False, views=1):
        batch = None if inputs.shape[0] is None else inputs.shape[0] * int(views)
        return keras.KerasTensor((batch, *inputs.shape[1:]), dtype=self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "alpha": self.alpha,
            "memory_size": self.memory_size,
            "seed": self.seed,
        }

