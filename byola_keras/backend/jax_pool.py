"""2x2 / stride-2 max-pooling for JAX whose gradient keeps one byte per output.

Differentiating a max, JAX keeps a float32 mask of where the maxima are, the
size of the pool's *input* (for the first conv block of an AudioNTT encoder
at batch 64: 96 MiB per view), until the backward pass. `max_pool_2x2`
keeps instead the position of each window's maximum (0-3, `int8`): a
sixteenth of that. The gradient goes to that one position, the first maximum
of the window in row-major order when several are equal, as in PyTorch's
and TensorFlow's max-pooling.

Channels-last `[N, H, W, C]` with even `H` and `W` (the caller crops).
"""

import jax
import jax.numpy as jnp


def _windows(x):
    """The four elements of each 2x2 window, row-major: four `[N, H/2, W/2, C]`."""
    n, height, width, channels = x.shape
    x = x.reshape(n, height // 2, 2, width // 2, 2, channels)
    return x[:, :, 0, :, 0], x[:, :, 0, :, 1], x[:, :, 1, :, 0], x[:, :, 1, :, 1]


@jax.custom_vjp
def max_pool_2x2(x):
    """Max over each 2x2 window of `x` `[N, H, W, C]` (`H`, `W` even)."""
    return _forward(x)[0]  # XLA drops the unused positions


def _forward(x):
    a, b, c, d = _windows(x)
    y = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
    position = jnp.where(a == y, 0, jnp.where(b == y, 1, jnp.where(c == y, 2, 3)))
    return y, position.astype(jnp.int8)


def _backward(position, g):
    n, half_h, half_w, channels = g.shape
    zero = jnp.zeros((), g.dtype)
    parts = [jnp.where(position == k, g, zero) for k in range(4)]
    # [N, H/2, W/2, C] x 4 -> [N, H/2, 2, W/2, 2, C] -> [N, H, W, C]
    top = jnp.stack(parts[:2], axis=3)
    bottom = jnp.stack(parts[2:], axis=3)
    grad = jnp.stack([top, bottom], axis=2)
    return (grad.reshape(n, 2 * half_h, 2 * half_w, channels),)


max_pool_2x2.defvjp(_forward, _backward)
