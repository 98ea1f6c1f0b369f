"""Batch normalization in training mode for JAX, with a hand-written gradient
that keeps only its input for the backward pass.

Differentiated automatically, the normalization keeps its centred input
`x - mean` for the backward pass: for the first conv block of an AudioNTT
encoder at batch 64, 96 MiB per view. `batch_norm_train` keeps `x` (which the layer before it holds anyway
when it is a convolution's output), the batch mean and `1 / sqrt(var + eps)`,
and recomputes the normalized values in the backward pass, where XLA fuses
them into the gradient's two reductions and its elementwise pass.

Normalizes over every axis but the last, with the biased batch variance.
"""

import jax
import jax.numpy as jnp


def _axes(x):
    return tuple(range(x.ndim - 1))


def _statistics(x, epsilon):
    axes = _axes(x)
    mean = jnp.mean(x, axis=axes)
    variance = jnp.mean(jnp.square(x - mean), axis=axes)
    return mean, variance, jax.lax.rsqrt(variance + epsilon)


@jax.custom_vjp
def _batch_norm(x, gamma, beta, epsilon):
    return _forward(x, gamma, beta, epsilon)[0]


def _forward(x, gamma, beta, epsilon):
    mean, variance, inv = _statistics(x, epsilon)
    y = (x - mean) * (inv * gamma) + beta
    return (y, mean, variance), (x, mean, inv, gamma, epsilon)


def _backward(residuals, cotangents):
    x, mean, inv, gamma, epsilon = residuals
    g, g_mean, g_variance = cotangents
    axes = _axes(x)
    count = x.size // x.shape[-1]
    centred = x - mean
    g_beta = jnp.sum(g, axis=axes)
    g_gamma = jnp.sum(g * centred, axis=axes) * inv
    # d/dx of (x - mean) * inv * gamma, through x, mean and the variance in inv.
    scale = gamma * inv
    g_x = scale * (g - (g_beta + centred * inv * g_gamma) / count)
    # The batch mean and variance are outputs too (for the moving statistics).
    g_x = g_x + g_mean / count + g_variance * (2.0 / count) * centred
    return g_x, g_gamma, g_beta, jnp.zeros_like(epsilon)


_batch_norm.defvjp(_forward, _backward)


def batch_norm_train(x, gamma, beta, epsilon):
    """`(y, mean, variance)`: `x` `[..., C]` normalized with its batch mean and
    biased variance over all axes but the last, then scaled by `gamma` and
    shifted by `beta`; float32 in, float32 out."""
    return _batch_norm(x, gamma, beta, jnp.asarray(epsilon, x.dtype))
