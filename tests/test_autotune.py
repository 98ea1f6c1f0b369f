"""Choices made by measurement (`byola_keras.backend.autotune`) and the
formulations they choose between (`byola_keras.backend.jax_conv`).

The choice is tested with a fake clock: each candidate advances it by a fixed
amount, so the outcome does not depend on how fast this machine is.
"""

import json

import numpy as np
import pytest

from byola_keras.backend import autotune


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.calls = {}

    def __call__(self):
        return self.now

    def candidate(self, name, seconds):
        def run():
            self.calls[name] = self.calls.get(name, 0) + 1
            self.now += seconds

        return run


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "autotune.json"
    monkeypatch.setenv("BYOLA_AUTOTUNE_CACHE", str(path))
    monkeypatch.delenv("BYOLA_AUTOTUNE_TOY", raising=False)
    monkeypatch.delenv("BYOLA_AUTOTUNE_CONV_WEIGHT_GRAD", raising=False)  # set by conftest
    autotune.forget()
    yield path
    autotune.forget()


def test_fastest_measures_once_and_remembers_per_machine(cache_file):
    clock = FakeClock()
    made = []

    def candidates():
        made.append(1)
        return {"slow": clock.candidate("slow", 0.5), "fast": clock.candidate("fast", 0.2)}

    assert autotune.fastest("toy", "shape A", candidates, libraries=("lib 1",), clock=clock) == "fast"
    assert len(made) == 1
    # Remembered in this process ...
    assert autotune.fastest("toy", "shape A", candidates, libraries=("lib 1",), clock=clock) == "fast"
    assert len(made) == 1
    # ... and in the file, under this machine's key, with the times measured.
    data = json.loads(cache_file.read_text())
    machine = autotune.machine_key(("lib 1",))
    entry = data[machine]["toy shape A"]
    assert entry["choice"] == "fast" and entry["ms"] == {"slow": 500.0, "fast": 200.0}
    autotune.forget()
    assert autotune.fastest("toy", "shape A", candidates, libraries=("lib 1",), clock=clock) == "fast"
    assert len(made) == 1
    # Another library version (or CPU) is another machine: measured again.
    other = lambda: {"slow": clock.candidate("slow", 0.1), "fast": clock.candidate("fast", 0.2)}  # noqa: E731
    assert autotune.fastest("toy", "shape A", other, libraries=("lib 2",), clock=clock) == "slow"
    assert set(json.loads(cache_file.read_text())) == {machine, autotune.machine_key(("lib 2",))}


def test_a_much_slower_candidate_is_not_called_again(cache_file):
    clock = FakeClock()
    candidates = {
        "slow": clock.candidate("slow", 1.0),
        "fast": clock.candidate("fast", 0.1),
        "close": clock.candidate("close", 0.15),
    }
    seconds = autotune.measure(candidates, repeats=3, clock=clock)
    assert clock.calls == {"slow": 1, "fast": 3, "close": 3}
    assert seconds == pytest.approx({"slow": 1.0, "fast": 0.1, "close": 0.15})


def test_forced_choice_and_memory_only_cache(cache_file, monkeypatch):
    clock = FakeClock()

    def candidates():
        raise AssertionError("a forced choice measures nothing")

    monkeypatch.setenv("BYOLA_AUTOTUNE_TOY", "slow")
    assert autotune.fastest("toy", "k", candidates, clock=clock) == "slow"
    monkeypatch.setenv("BYOLA_AUTOTUNE_TOY", "default")
    assert autotune.fastest("toy", "k", candidates, default="plain", clock=clock) == "plain"
    monkeypatch.delenv("BYOLA_AUTOTUNE_TOY")
    monkeypatch.setenv("BYOLA_AUTOTUNE_CACHE", "off")
    assert autotune.cache_path() is None
    measured = lambda: {"a": clock.candidate("a", 0.3), "b": clock.candidate("b", 0.2)}  # noqa: E731
    assert autotune.fastest("toy", "k", measured, clock=clock) == "b"
    assert not cache_file.exists()


def test_an_unwritable_cache_file_only_costs_a_measurement(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("BYOLA_AUTOTUNE_CACHE", str(blocker / "autotune.json"))
    autotune.forget()
    clock = FakeClock()
    measured = lambda: {"a": clock.candidate("a", 0.3), "b": clock.candidate("b", 0.2)}  # noqa: E731
    assert autotune.fastest("toy", "k", measured, clock=clock) == "b"
    autotune.forget()


def test_measurement_errors_reach_the_caller(cache_file):
    def candidates():
        raise ValueError("no such kernel")

    with pytest.raises(ValueError, match="no such kernel"):
        autotune.fastest("toy", "broken", candidates)


# --- the two kernel gradients of the JAX convolution ---------------------------------
@pytest.mark.parametrize(
    "x_shape, kernel_shape, chunk",
    [
        ((5, 8, 7, 1), (3, 3, 1, 6), 2),  # one input channel; 5 = 2 chunks of 2 + 1
        ((4, 6, 9, 3), (3, 5, 3, 4), 3),  # a 3x5 kernel; 4 = 1 chunk of 3 + 1
        ((3, 5, 4, 2), (1, 1, 2, 3), 8),  # 1x1 kernel; chunk larger than the batch
    ],
)
def test_conv_weight_gradient_formulations_agree(x_shape, kernel_shape, chunk, cache_file):
    import jax
    import jax.numpy as jnp

    from byola_keras.backend import jax_conv

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape).astype("float32"))
    kernel = jnp.asarray(rng.normal(size=kernel_shape).astype("float32"))
    w = jnp.asarray(rng.normal(size=x_shape[:3] + kernel_shape[-1:]).astype("float32"))

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.tanh(conv(x, k)) * w)

    plain = jax.grad(loss(jax_conv._conv), argnums=(0, 1))(x, kernel)
    assert float(jnp.abs(plain[1]).max()) > 0
    for method in ("xla", "patches"):
        conv = lambda x, k: jax_conv.conv2d(x, k, method, chunk)  # noqa: E731
        np.testing.assert_allclose(conv(x, kernel), jax_conv._conv(x, kernel), rtol=0, atol=0)
        got = jax.jit(jax.grad(loss(conv), argnums=(0, 1)))(x, kernel)
        np.testing.assert_allclose(got[0], plain[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1], plain[1], rtol=1e-5, atol=1e-5)
    # "auto" (the layers' default) measures both here and takes one of them.
    got = jax.grad(loss(jax_conv.conv2d), argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(got[1], plain[1], rtol=1e-5, atol=1e-5)
    assert json.loads(cache_file.read_text())


def test_auto_uses_the_cached_choice(cache_file, monkeypatch):
    """With a choice on file for these shapes, "auto" runs that formulation and
    measures nothing."""
    import jax
    import jax.numpy as jnp

    from byola_keras.backend import jax_conv

    x_shape, kernel_shape = (2, 4, 4, 2), (3, 3, 2, 3)
    used = []
    for name in ("patches", "xla"):
        real = getattr(jax_conv, f"weight_grad_{name}")
        spy = lambda *a, name=name, real=real, **k: used.append(name) or real(*a, **k)  # noqa: E731
        monkeypatch.setattr(jax_conv, f"weight_grad_{name}", spy)
    for choice in ("patches", "xla"):
        autotune.forget()
        key = jax_conv.weight_grad_key(x_shape, x_shape[:3] + (3,), kernel_shape, "float32", 2)
        machine = autotune.machine_key(jax_conv.weight_grad_libraries())
        cache_file.write_text(json.dumps({machine: {f"conv_weight_grad {key}": {"choice": choice}}}))
        x, k = jnp.ones(x_shape), jnp.ones(kernel_shape)
        grad = jax.grad(lambda k: jnp.sum(jax_conv.conv2d(x, k)))(k)
        assert used[-1] == choice
        assert float(grad[1, 1].min()) == 2 * 4 * 4  # the centre tap sees every input


class _FakeCoordinationClient:
    """The part of JAX's coordination-service client that `shared_choice` uses."""

    def __init__(self, store):
        self.store = store

    def key_value_set(self, key, value):
        assert key not in self.store, "set twice"
        self.store[key] = value

    def blocking_key_value_get(self, key, timeout_in_ms):
        assert timeout_in_ms > 0
        return self.store[key]  # a KeyError here: process 0 never published


def test_every_process_of_a_jax_job_uses_process_0s_choice(cache_file, monkeypatch):
    """Process 0 decides (file or measurement) and publishes; process 1 takes
    its choice without measuring, even where its own timing would differ; one
    process decides alone."""
    import jax
    from jax._src import distributed

    from byola_keras.backend import multiprocess

    store = {}
    monkeypatch.setattr(distributed.global_state, "client", _FakeCoordinationClient(store))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    choices = {}
    for process, fast in ((0, "a"), (1, "b")):  # each process's own timing favours another
        monkeypatch.setattr(jax, "process_index", lambda process=process: process)
        monkeypatch.setenv("BYOLA_AUTOTUNE_CACHE", str(cache_file.with_name(f"autotune-{process}.json")))
        autotune.forget()
        clock = FakeClock()
        candidates = lambda: {n: clock.candidate(n, 1.0 if n == fast else 5.0) for n in "ab"}  # noqa: E731
        choices[process] = autotune.fastest("toy", "shape", candidates, clock=clock, share=multiprocess.shared_choice)
        if process == 1:
            assert clock.calls == {}  # took process 0's choice, measured nothing
    assert choices == {0: "a", 1: "a"}
    assert list(store.values()) == ["a"]
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    autotune.forget()
    clock = FakeClock()
    assert autotune.fastest(
        "toy", "other", lambda: {n: clock.candidate(n, 1.0 if n == "b" else 5.0) for n in "ab"}, clock=clock,
        share=multiprocess.shared_choice,
    ) == "b"
    assert len(store) == 1
