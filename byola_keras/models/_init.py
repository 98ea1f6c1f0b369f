"""Weight initialisation of the BYOL-A networks: PyTorch's defaults or Keras's.

The official networks keep PyTorch's default initialisation (SPEC.md, "BYOL
learner"): `nn.Conv2d` and `nn.Linear` weights are Kaiming-uniform with
`a = sqrt(5)`, i.e. uniform in +-1/sqrt(fan_in), and their biases are uniform
in the same bound; BatchNorm starts at gamma 1, beta 0 (Keras's default too).
`init="torch"` gives exactly these distributions: kernels and biases both
`FanInUniform(fan_in)`, with the layer's fan-in (`H * W * C_in` of a conv,
`in` of a dense layer; a bias's shape does not tell it, so it is given).
`FanInUniform` draws its values on the host with NumPy from its integer seed:
on JAX, `keras.random.uniform` compiles an XLA program for every weight shape
(about 0.7 s of CPU each; 10 shapes in a v1 learner), which made building a
learner cost more than a training step.

`init="keras"` keeps Keras's defaults (Glorot-uniform kernels, zero biases).
Each layer gets initializer instances of its own: an unseeded Keras
initializer draws its seed once, when it is created.
"""

import math

import keras
import numpy as np

INITS = ("torch", "keras")


@keras.saving.register_keras_serializable(package="byola_keras")
class FanInUniform(keras.initializers.RandomUniform):
    """Uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in))`: PyTorch's default bias
    initialisation of `nn.Linear` and `nn.Conv2d`.

    Args:
        fan_in: the fan-in of the layer the bias belongs to (inputs per output
            unit: `in_features`, or `C_in * kH * kW` for a convolution).
        seed: integer or `keras.random.SeedGenerator`, as for Keras's
            random initializers.

    Example:

    >>> bias = FanInUniform(fan_in=576)((64,))  # conv 3x3 with 64 input channels
    """

    def __init__(self, fan_in, seed=None):
        fan_in = int(fan_in)
        if fan_in < 1:
            raise ValueError(f"`fan_in` must be a positive integer; got fan_in={fan_in}.")
        self.fan_in = fan_in
        bound = 1.0 / math.sqrt(fan_in)
        super().__init__(minval=-bound, maxval=bound, seed=seed)

    def __call__(self, shape, dtype=None):
        if not isinstance(self.seed, int):  # a SeedGenerator: drawn by the backend
            return super().__call__(shape, dtype=dtype)
        dtype = keras.backend.standardize_dtype(dtype or keras.backend.floatx())
        values = np.random.default_rng(self.seed).uniform(self.minval, self.maxval, size=tuple(shape))
        return keras.ops.convert_to_tensor(values.astype(dtype), dtype=dtype)

    def get_config(self):
        config = super().get_config()
        config.pop("minval")
        config.pop("maxval")
        return {**config, "fan_in": self.fan_in}


def check_init(init):
    if init not in INITS:
        raise ValueError(f"`init` must be one of {INITS}; got init={init!r}.")
    return init


def torch_bound(fan_in):
    """PyTorch's default weight and bias bound, `1/sqrt(fan_in)`."""
    return 1.0 / math.sqrt(fan_in)


def layer_initializers(init, fan_in):
    """`kernel_initializer` / `bias_initializer` arguments of one Dense or
    Conv layer whose fan-in is `fan_in`."""
    if check_init(init) == "keras":
        return {"kernel_initializer": "glorot_uniform", "bias_initializer": "zeros"}
    return {"kernel_initializer": FanInUniform(fan_in), "bias_initializer": FanInUniform(fan_in)}
