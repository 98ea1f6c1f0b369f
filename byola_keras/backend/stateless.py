"""A layer's `stateless_call`, compiled once on JAX, for calls outside `fit()`.

JAX runs an eager `keras.ops` call primitive by primitive, compiling each
one for its shapes; the augmentation module called eagerly on one segment
(the TensorBoard image) compiles a program per primitive (measured in
docs/performance.md). Under `jax.jit` it is one program, compiled once per
input shape and reused. TensorFlow and PyTorch run eager ops from precompiled kernels:
their `stateless_call` is used as it is.
"""

import weakref

import keras

_COMPILED = weakref.WeakKeyDictionary()


def stateless_call(layer, trainable, non_trainable, inputs, **kwargs):
    """`layer.stateless_call(trainable, non_trainable, inputs, **kwargs)`;
    on JAX through one `jax.jit` per layer and keyword arguments (which must
    be hashable: `training=True` and the like)."""
    if keras.backend.backend() != "jax":
        return layer.stateless_call(trainable, non_trainable, inputs, **kwargs)
    import jax

    per_layer = _COMPILED.setdefault(layer, {})
    key = tuple(sorted(kwargs.items()))
    if key not in per_layer:
        owner = weakref.ref(layer)  # the cache must not keep the layer alive
        per_layer[key] = jax.jit(lambda t, n, x: owner().stateless_call(t, n, x, **kwargs))
    return per_layer[key](trainable, non_trainable, inputs)
