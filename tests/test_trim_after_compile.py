"""`byola_keras.backend.trim_after_compile`: malloc's free memory is given back
after each XLA compilation, before the compiled program first runs.

They call JAX directly (every test environment installs it), so they run
under every Keras backend."""

import jax
import jax.numpy as jnp
import numpy as np

from byola_keras.backend import trim_after_compile


def test_the_listener_trims_after_compilations_leaving_much_free_memory():
    trims = []
    free = {"bytes": 0}
    listener = trim_after_compile.make_listener(
        min_free_bytes=100, free_bytes=lambda: free["bytes"], trim=lambda: trims.append(free["bytes"])
    )
    listener(trim_after_compile.COMPILE_EVENT, 3.0)
    free["bytes"] = 101
    listener("/jax/some/other/event", 3.0)
    assert trims == []
    listener(trim_after_compile.COMPILE_EVENT, 3.0, fun_name="step")
    assert trims == [101]
    free["bytes"] = None  # not glibc's mallinfo2: trim all the same
    listener(trim_after_compile.COMPILE_EVENT, 0.1)
    assert trims == [101, None]


def test_a_real_compilation_is_followed_by_the_trim_before_the_program_runs():
    order = []
    active = [True]

    def trim():
        if active[0]:
            order.append("trim")

    jax.monitoring.register_event_duration_secs_listener(
        trim_after_compile.make_listener(min_free_bytes=-1, free_bytes=lambda: 0, trim=trim)
    )

    def record(x):
        order.append("run")
        return x

    @jax.jit
    def program(x):
        y = jnp.sin(x) * 3.0
        return jax.pure_callback(record, jax.ShapeDtypeStruct(y.shape, y.dtype), y)

    try:
        result = program(np.arange(5, dtype=np.float32))
        np.testing.assert_allclose(np.asarray(result), np.sin(np.arange(5)) * 3.0, rtol=1e-6)
        assert "run" in order and "trim" in order[: order.index("run")]
        runs_before = len(order)
        program(np.arange(5, dtype=np.float32))  # compiled already: runs, no new trim
        assert order[runs_before:] == ["run"]
    finally:
        active[0] = False


def test_install_registers_once_and_only_on_jax(monkeypatch):
    if not trim_after_compile._installed:
        monkeypatch.setenv("BYOLA_REUSE_FREED_MEMORY", "0")
        assert trim_after_compile.install("jax") is False and trim_after_compile._installed == []
        monkeypatch.delenv("BYOLA_REUSE_FREED_MEMORY")
    assert trim_after_compile.install("tensorflow") is False
    assert trim_after_compile.install("torch") is False
    assert trim_after_compile.install("jax") is True
    assert trim_after_compile.install("jax") is True
    assert len(trim_after_compile._installed) == 1
    trims = []
    monkeypatch.setattr(trim_after_compile.allocator, "free_bytes", lambda: 1 << 40)
    monkeypatch.setattr(trim_after_compile.allocator, "return_free_memory", lambda: trims.append(1))
    jax.jit(lambda x: jnp.cos(x) + 7.0)(np.ones(3, np.float32))  # a program not compiled before
    assert trims == [1]  # one listener, registered with JAX
