"""A persistent cache of compiled programs for the command line (JAX).

JAX compiles the training step on every run (seconds of CPU; measured in
docs/performance.md). With JAX's
persistent compilation cache, a later run with the same step (same model,
batch size, flags, jax/jaxlib and machine: JAX's cache key) loads the
compiled program instead. The command line turns it on in
`<cache root>/jax-compilation-cache` (see `byola_keras._files.cache_root`),
keeping at most 2 GiB (JAX evicts the least recently used entries);
programs that compile in under a second are not stored.

It is set through JAX's own environment variables before JAX is imported,
and not at all where the user set `JAX_COMPILATION_CACHE_DIR` or
`BYOLA_COMPILATION_CACHE=off`. TensorFlow and PyTorch are left as they are.
"""

import os

DISABLE_ENV = "BYOLA_COMPILATION_CACHE"
MAX_BYTES = 2 * 1024**3


def folder():
    """Where the command line keeps JAX's compiled programs."""
    from byola_keras import _files

    return os.path.join(_files.cache_root(), "jax-compilation-cache")


def enable_for_jax(backend=None):
    """Turn JAX's persistent compilation cache on (call before JAX is
    imported; no effect on the other backends, when disabled, or when the
    user chose a cache folder). `backend`: the Keras backend of this process
    (default: `KERAS_BACKEND`). Returns the folder, or None."""
    if backend is None:
        backend = os.environ.get("KERAS_BACKEND", "")
    if backend.strip().lower() != "jax":
        return None
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    path = folder()
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(MAX_BYTES))
    return path
