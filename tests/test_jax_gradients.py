"""The hand-written JAX gradients of the conv block (`jax_pool`, `jax_batch_norm`)
equal the automatic ones and keep less memory for the backward pass.

They call JAX directly (every test environment installs it), so they run
under every Keras backend; the Keras layers that use them are checked against
Keras's own in test_performance_paths.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byola_keras.backend import jax_batch_norm, jax_pool


def _plain_batch_norm(x, gamma, beta, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    variance = jnp.mean(jnp.square(x - mean), axis=axes)
    return (x - mean) / jnp.sqrt(variance + epsilon) * gamma + beta, mean, variance


def _plain_pool(x):
    n, h, w, c = x.shape
    return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _pool_gradient_first_max(x, g):
    """NumPy: each window's gradient to its first maximum, row-major."""
    n, h, w, c = x.shape
    out = np.zeros_like(x)
    for i in range(h // 2):
        for j in range(w // 2):
            window = x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, :].reshape(n, 4, c)
            first = np.argmax(window, axis=1)  # numpy's argmax takes the first maximum
            for k in range(4):
                out[:, 2 * i + k // 2, 2 * j + k % 2, :] += np.where(first == k, g[:, i, j, :], 0.0)
    return out


def test_max_pool_values_and_gradient_with_ties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 6, 8, 5)).astype("float32")
    x[:, :2, :2, :] = 1.0  # a window of four equal maxima
    x[:, 2:4, 4:6, :] = np.maximum(x[:, 2:4, 4:6, :], 0.0)  # zeros tied after a ReLU
    x[0, 4, 0, 0] = x[0, 5, 1, 0] = 9.0  # tied first and last positions
    g = rng.normal(size=(3, 3, 4, 5)).astype("float32")
    y, vjp = jax.vjp(jax_pool.max_pool_2x2, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(_plain_pool(x)))
    (grad,) = vjp(jnp.asarray(g))
    np.testing.assert_array_equal(np.asarray(grad), _pool_gradient_first_max(x, g))
    # Where no window has ties the gradient is the automatic one.
    x = rng.normal(size=(3, 6, 8, 5)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(jax.vjp(jax_pool.max_pool_2x2, x)[1](g)[0]),
        np.asarray(jax.vjp(_plain_pool, x)[1](g)[0]),
    )


@pytest.mark.parametrize("shape", [(4, 6, 8, 3), (7, 5)])
def test_batch_norm_outputs_and_gradients_match_automatic_differentiation(shape):
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=shape).astype("float32")
    channels = shape[-1]
    gamma = rng.uniform(0.5, 1.5, channels).astype("float32")
    beta = rng.normal(size=channels).astype("float32")
    args = (jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta))
    ours, ours_vjp = jax.vjp(lambda *a: jax_batch_norm.batch_norm_train(*a, 1e-5), *args)
    plain, plain_vjp = jax.vjp(lambda *a: _plain_batch_norm(*a, 1e-5), *args)
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # Cotangents for all three outputs: the mean and variance feed the
    # moving statistics, whose gradient is otherwise stopped.
    cotangents = (
        jnp.asarray(rng.normal(size=shape).astype("float32")),
        jnp.asarray(rng.normal(size=channels).astype("float32")),
        jnp.asarray(rng.normal(size=channels).astype("float32")),
    )
    for a, b in zip(ours_vjp(cotangents), plain_vjp(cotangents)):
        scale = float(np.abs(np.asarray(b)).max())
        assert scale > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)


def _backward_bytes(batch_norm, pool, x, kernel, gamma, beta):
    """Temporary bytes of the compiled gradient of conv -> BN -> ReLU -> pool."""

    def loss(x, kernel, gamma, beta):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = jax.nn.relu(batch_norm(y, gamma, beta, 1e-5)[0])
        return jnp.sum(jnp.square(pool(y)))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, kernel, gamma, beta).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_the_conv_block_backward_keeps_less_memory():
    """Compiled by XLA, the block's gradient with both hand-written rules needs
    at least one activation-sized buffer less than with automatic ones."""
    x = jnp.ones((8, 32, 48, 16), jnp.float32)
    kernel = jnp.ones((3, 3, 16, 32), jnp.float32)
    gamma = beta = jnp.ones((32,), jnp.float32)
    activation = 8 * 32 * 48 * 32 * 4
    plain = _backward_bytes(_plain_batch_norm, _plain_pool, x, kernel, gamma, beta)
    ours = _backward_bytes(jax_batch_norm.batch_norm_train, jax_pool.max_pool_2x2, x, kernel, gamma, beta)
    assert ours <= plain - activation, (ours, plain, activation)
