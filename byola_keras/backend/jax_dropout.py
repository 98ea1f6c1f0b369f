"""Dropout on JAX with the mask's random bits computed by fused elementwise ops.

Keras's dropout on JAX draws its mask with `jax.random.bernoulli`, whose
Threefry-2x32 bits JAX lowers on a CPU as a rolled loop of five iterations,
each reading and writing two arrays the size of the mask: several passes over
memory instead of one. `dropout` computes the same bits, the same uniform
values and so the same mask as `keras.random.dropout` under JAX's default
Threefry settings (`jax_threefry_partitionable`, on by default), from the
same `SeedGenerator` draw, with the rounds written out as elementwise
`jax.numpy` operations that XLA fuses into one pass.

Threefry-2x32 with 20 rounds as specified by Salmon, Moraes, Dror and Shaw,
"Parallel random numbers: as easy as 1, 2, 3" (SC 2011): a key of two 32-bit
words, a three-word key schedule with the parity constant 0x1BD11BDA,
rotations 13, 15, 26, 6, 17, 29, 16, 24, and a key injection after every four
rounds. JAX's partitionable layout hashes each element's flat index (as two
32-bit words, high then low) and keeps the XOR of the two output words.
"""

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x, bits):
    return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(key, x0, x1):
    """Threefry-2x32 (20 rounds) of the counter words `x0`, `x1` (uint32
    arrays of one shape) under `key` (uint32[2]); the two output words."""
    schedule = (key[0], key[1], key[0] ^ key[1] ^ _PARITY)
    x0 = x0 + schedule[0]
    x1 = x1 + schedule[1]
    for injection in range(1, 6):
        for rotation in _ROTATIONS[4 * ((injection - 1) % 2): 4 * ((injection - 1) % 2) + 4]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, rotation) ^ x0
        x0 = x0 + schedule[injection % 3]
        x1 = x1 + schedule[(injection + 1) % 3] + np.uint32(injection)
    return x0, x1


def random_bits(key, shape):
    """uint32 random bits of `shape` (fewer than 2**32 elements), equal to
    `jax.random.bits(key, shape, jnp.uint32)` with a raw Threefry `key`."""
    size = int(np.prod(shape, dtype=np.int64))
    if size >= 2**32:
        raise ValueError(f"random_bits: {size} elements; at most 2**32 - 1.")
    flat_index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        flat_index = flat_index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride *= shape[axis]
    key = jnp.asarray(key).astype(jnp.uint32)
    high, low = threefry2x32(key, jnp.zeros(shape, jnp.uint32), flat_index)
    return high ^ low


def keep_mask(key, keep_prob, shape):
    """`jax.random.bernoulli(key, keep_prob, shape)`: uniform float32 values
    in [0, 1) from the top 23 bits, compared with `keep_prob`."""
    bits = random_bits(key, shape)
    mantissa = (bits >> np.uint32(9)) | np.uint32(0x3F800000)
    uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
    return uniform < np.float32(keep_prob)


def dropout(inputs, rate, seed):
    """`keras.random.dropout(inputs, rate, seed=...)` on JAX for the seed
    array `seed` (a `SeedGenerator.next()` draw): the same outputs."""
    if rate == 1.0:
        return jnp.zeros_like(inputs)
    if rate == 0.0:
        return inputs
    keep_prob = 1.0 - rate
    mask = keep_mask(seed, keep_prob, tuple(inputs.shape))
    return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))
