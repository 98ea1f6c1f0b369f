import keras
from keras import ops

from byola_keras import distribute, frontend


@keras.saving.register_keras_serializable(package="byola_keras")
class LogMixupExp(keras.layers.Layer):
    """BYOL-A mixup in the linear-power domain with a FIFO memory bank.

    Each sample `x` is mixed with a background sample `z` drawn at random from a
    memory bank of earlier (pre-normalized) inputs:
    `x' = log((1 - l) exp(x) + l exp(z) + eps)`, with `l ~ U(0, alpha)` drawn per
    sample. Mixup acts on features only (no labels). After mixing, the incoming
    batch is pushed into the bank (first in, first out). While the bank is empty
    the input passes unchanged.

    The bank is a non-trainable weight written with `assign()` inside `call`, so
    it lives on the device, is updated inside jit-compiled training steps on every
    backend, and is saved with the model. Unlike the official code (one bank per
    data-loader worker, filled one sample at a time), the bank is shared by the
    whole batch. Run the layer inside the model, not inside `tf.data`.
    The exp/log maths always runs in float32.

    Input shape:
        `(batch, n_mels, frames, channels)`; `batch <= memory_size`.

    Output shape:
        Same as the input.

    Args:
        alpha: upper bound of the background weight `l` (0.4 in v1, 0.2 in v2).
        memory_size: number of past samples kept in the bank (2,048).
        seed: integer seed for the random draws.
        **kwargs: standard layer arguments.

    Call arguments:
        inputs: the batch to mix.
        training: mix only when `True`; otherwise return `inputs`.
        memory_inputs: what to push into the bank after mixing (default:
            `inputs`). The augmentation module passes each segment once although
            it mixes two views of it.

    Example:

    >>> layer = LogMixupExp(alpha=0.4, memory_size=2048, seed=0)
    >>> y = layer(x, training=True)  # passes x; fills the bank
    >>> y = layer(x2, training=True)  # mixes x2 with samples of x

    References:
        - [Niizumi et al., BYOL for Audio, IJCNN 2021](https://arxiv.org/abs/2103.06695)
        - [Niizumi et al., BYOL for Audio: Exploring Pre-trained
          General-purpose Audio Representations, TASLP 2023](https://arxiv.org/abs/2204.07402)
    """

    def __init__(self, alpha=0.4, memory_size=2048, seed=None, **kwargs):
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
        lam = keras.random.uniform(
            (batch_size,), 0.0, self.alpha, seed=self.seed_generator, dtype="float32"
        )
        u = keras.random.uniform((batch_size,), 0.0, 1.0, seed=self.seed_generator)
        filled = ops.cast(self.memory_filled, "float32")
        index = ops.cast(ops.floor(u * filled), "int32")
        index = ops.clip(index, 0, ops.maximum(self.memory_filled - 1, 0))
        return lam, index

    @staticmethod
    def mix(x, background, lam):
        """`log((1 - lam) exp(x) + lam exp(background) + eps)`, lam of shape `[B]`."""
        x = ops.cast(x, "float32")
        background = ops.cast(background, "float32")
        lam = ops.reshape(ops.cast(lam, "float32"), (-1,) + (1,) * (len(x.shape) - 1))
        return ops.log((1.0 - lam) * ops.exp(x) + lam * ops.exp(background) + frontend.LOG_EPS)

    def call(self, inputs, training=False, memory_inputs=None):
        if not training:
            return inputs
        if self.alpha > 0.0:
            batch_size = ops.shape(inputs)[0]
            lam, index = self.draw_params(batch_size)
            background = ops.take(self.memory, index, axis=0)
            mixed = self.mix(inputs, background, lam)
            outputs = ops.where(self.memory_filled > 0, mixed, ops.cast(inputs, "float32"))
        else:
            outputs = inputs
        self._push(inputs if memory_inputs is None else memory_inputs)
        return ops.cast(outputs, self.compute_dtype)

    def _push(self, batch):
        # Under tf.distribute every replica pushes the global batch, so that the
        # replicas' banks stay identical (a no-op elsewhere).
        batch = distribute.gather_from_replicas(batch)
        if batch.shape[0] is not None and batch.shape[0] > self.memory_size:
            batch = batch[-self.memory_size :]  # only the newest fit
        n = ops.shape(batch)[0]
        positions = ops.mod(self.memory_pointer + ops.arange(n, dtype="int32"), self.memory_size)
        self.memory.assign(
            ops.scatter_update(
                self.memory, ops.expand_dims(positions, -1), ops.cast(batch, self.memory.dtype)
            )
        )
        n = ops.cast(n, "int32")
        self.memory_pointer.assign(ops.mod(self.memory_pointer + n, self.memory_size))
        self.memory_filled.assign(ops.minimum(self.memory_filled + n, self.memory_size))

    def reset_memory(self):
        """Empty the bank."""
        self.memory.assign(ops.zeros_like(self.memory))
        self.memory_filled.assign(0)
        self.memory_pointer.assign(0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "alpha": self.alpha,
            "memory_size": self.memory_size,
            "seed": self.seed,
        }
