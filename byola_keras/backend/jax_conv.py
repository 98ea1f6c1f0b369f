"""2-D convolution on JAX with a choice of how its kernel gradient is computed.

`conv2d(x, kernel, weight_grad=...)` is `lax.conv_general_dilated` for
channels-last, stride-1, "same"-padded convolutions with odd kernel sizes (the
encoders' 3x3 convs): the forward pass and the input gradient are XLA's own;
the kernel gradient is one of

- `"xla"`: XLA's transposed convolution (what `jax.grad` of the convolution
  gives);
- `"patches"`: the sum over chunks of the batch of `patches(x)^T @ g`, where
  `patches(x)` holds each output position's `kh * kw * C` input values (the
  image-to-column form), built for one chunk of `chunk` samples at a time so
  that the temporary stays a few megabytes.

Both give the same gradient up to float rounding (the sums run in another
order). Which is faster depends on the CPU and on XLA's convolution kernels,
so `weight_grad="auto"` (the default) measures both on the shapes at hand the
first time a gradient is traced (`byola_keras.backend.autotune`, kind
`conv_weight_grad`); off the CPU it uses XLA's.
"""

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
WEIGHT_GRADS = ("auto", "xla", "patches")


def supported(x_shape, kernel_shape, strides=(1, 1), dilation=(1, 1), padding="same", groups=1):
    """Whether `conv2d` computes this convolution (else use `lax` directly)."""
    return (
        len(x_shape) == 4
        and len(kernel_shape) == 4
        and tuple(strides) == (1, 1)
        and tuple(dilation) == (1, 1)
        and padding == "same"
        and groups == 1
        and kernel_shape[0] % 2 == 1
        and kernel_shape[1] % 2 == 1
        and x_shape[-1] == kernel_shape[2]
    )


def _conv(x, kernel):
    return lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=DIMENSION_NUMBERS
    )


def patches(x, kh, kw):
    """`[B, H, W, kh * kw * C]`: the input values under each output position's
    kernel window, zero-padded ("same"), ordered `(i, j, c)` like an HWIO kernel."""
    height, width = x.shape[1], x.shape[2]
    ph, pw = kh // 2, kw // 2
    padded = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    taps = [padded[:, i : i + height, j : j + width, :] for i in range(kh) for j in range(kw)]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def weight_grad_patches(x, g, kh, kw, chunk=2):
    """Kernel gradient `[kh, kw, C, O]` of the "same" convolution of `x`
    `[B, H, W, C]` given the output gradient `g` `[B, H, W, O]`, as
    `sum over chunks of patches(x_chunk)^T @ g_chunk` (float32 accumulation)."""
    batch, channels, filters = x.shape[0], x.shape[-1], g.shape[-1]

    def part(xc, gc):
        return jnp.einsum(
            "bhwk,bhwo->ko", patches(xc, kh, kw), gc, preferred_element_type=jnp.float32
        )

    chunk = max(1, min(int(chunk), batch))
    steps, rest = divmod(batch, chunk)
    total = jnp.zeros((kh * kw * channels, filters), jnp.float32)
    if steps > 1:
        body = lambda acc, xg: (acc + part(*xg), None)  # noqa: E731
        split = lambda a: a[: steps * chunk].reshape(steps, chunk, *a.shape[1:])  # noqa: E731
        total, _ = lax.scan(body, total, (split(x), split(g)))
    elif steps == 1:
        total = part(x[:chunk], g[:chunk])
    if rest:
        total = total + part(x[steps * chunk :], g[steps * chunk :])
    return total.reshape(kh, kw, channels, filters)


def weight_grad_xla(x, g, kernel_shape, dtype):
    kernel = jnp.zeros(kernel_shape, dtype)
    return jax.vjp(lambda k: _conv(x, k), kernel)[1](g)[0]


def _jaxlib_version():
    from importlib import metadata

    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return jax.__version__


def choose_weight_grad(x_shape, g_shape, kernel_shape, dtype, chunk=2):
    """`"xla"` or `"patches"`: the faster kernel gradient on this machine for
    these shapes (measured once, see `autotune`); `"xla"` off the CPU."""
    from byola_keras.backend import autotune, multiprocess

    if jax.default_backend() != "cpu":
        return "xla"
    dtype = jnp.dtype(dtype)

    def candidates():
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np

        # Inputs: uniform values in [0.5, 1.5) (the timings do not depend on
        # the values; normal draws on the host took longer than timing both
        # kernels, and random draws on the device compile programs of their own).
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.random(x_shape, dtype="float32") + 0.5, dtype)
        g = jnp.asarray(rng.random(g_shape, dtype="float32") + 0.5, dtype)
        kh, kw = kernel_shape[0], kernel_shape[1]
        # The two programs compile at once (XLA compiles on one thread each).
        with ThreadPoolExecutor(2) as pool:
            xla, gemm = pool.map(
                lambda f: jax.jit(f).lower(x, g).compile(),
                [
                    lambda x, g: weight_grad_xla(x, g, kernel_shape, dtype),
                    lambda x, g: weight_grad_patches(x, g, kh, kw, chunk),
                ],
            )
        return {
            "xla": lambda: jax.block_until_ready(xla(x, g)),
            "patches": lambda: jax.block_until_ready(gemm(x, g)),
        }

    key = weight_grad_key(x_shape, g_shape, kernel_shape, dtype, chunk)
    return autotune.fastest(
        "conv_weight_grad", key, candidates, libraries=weight_grad_libraries(), default="xla",
        share=multiprocess.shared_choice,  # one choice for every process of a job
    )


def weight_grad_key(x_shape, g_shape, kernel_shape, dtype, chunk):
    """What a kernel-gradient choice is remembered under, with the machine's key."""
    dtype = jnp.dtype(dtype).name
    return f"x{list(x_shape)} g{list(g_shape)} k{list(kernel_shape)} {dtype} chunk{chunk}"


def weight_grad_libraries():
    """The versions and settings that can change which formulation is faster."""
    return (f"jaxlib {_jaxlib_version()}", f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, weight_grad="auto", chunk=2):
    """"Same" stride-1 convolution of channels-last `x` with an HWIO `kernel`
    (see the module docstring for `weight_grad`)."""
    return _conv(x, kernel)


def _conv2d_fwd(x, kernel, weight_grad, chunk):
    return _conv(x, kernel), (x, kernel)


def _conv2d_bwd(weight_grad, chunk, residuals, g):
    x, kernel = residuals
    dx = jax.vjp(lambda v: _conv(v, kernel), x)[1](g)[0]
    if weight_grad == "auto":
        weight_grad = choose_weight_grad(x.shape, g.shape, kernel.shape, x.dtype, chunk)
    if weight_grad == "patches":
        kh, kw = kernel.shape[0], kernel.shape[1]
        dk = weight_grad_patches(x, g, kh, kw, chunk).astype(kernel.dtype)
    else:
        dk = weight_grad_xla(x, g, kernel.shape, kernel.dtype)
    return dx, dk


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
