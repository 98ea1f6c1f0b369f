"""Give the memory an XLA compilation leaves free back to the operating system (JAX).

Compiling the training step on a CPU leaves hundreds of MiB free inside
malloc's heap (XLA's and LLVM's working memory), and Keras's JAX trainer runs
the step right after compiling it, in the same call: the step's temporaries
then come on top of that free space, and the process's peak resident memory
with them. `install()` registers a listener of JAX's compilation events
(`jax.monitoring`): after every compilation, before the compiled program
first runs, when malloc holds more than `min_free_bytes` free, the free pages
are returned (`byola_keras.allocator.return_free_memory`). Measured in
docs/performance.md.

Not for the other backends: `install()` is a no-op there, and where
`BYOLA_REUSE_FREED_MEMORY=0` leaves malloc as the process started.
"""

import threading

from byola_keras import allocator

# JAX records this event when a backend compilation (or a load from the
# persistent cache) has finished, before the program is first executed.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
MIN_FREE_BYTES = 64 * 1024**2

_installed = []
_lock = threading.Lock()


def make_listener(min_free_bytes=MIN_FREE_BYTES, free_bytes=None, trim=None):
    """The `jax.monitoring` duration listener `install()` registers
    (`free_bytes`, `trim`: default `allocator.free_bytes` and
    `allocator.return_free_memory`)."""

    def listener(event, duration, **kwargs):
        if event != COMPILE_EVENT:
            return
        free = (free_bytes or allocator.free_bytes)()
        if free is None or free > min_free_bytes:
            (trim or allocator.return_free_memory)()

    return listener


def install(backend, min_free_bytes=MIN_FREE_BYTES):
    """On JAX, trim malloc's free memory after each compilation (once per
    process; later calls do nothing), unless `BYOLA_REUSE_FREED_MEMORY=0`
    leaves malloc as it is. Returns whether the listener is registered."""
    if backend != "jax" or (allocator.opted_out() and not _installed):
        return False
    with _lock:
        if not _installed:
            import jax.monitoring

            listener = make_listener(min_free_bytes)
            jax.monitoring.register_event_duration_secs_listener(listener)
            _installed.append(listener)
    return True
