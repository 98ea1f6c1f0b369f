"""Test configuration: one backend per process, chosen by KERAS_BACKEND.

torch is imported before TensorFlow (the reverse order can segfault), and the
shared reference folder is found through BYOLA_SHARED (set by .ci/run).
"""

import os
import pathlib

import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:  # noqa: SIM105
    import torch  # noqa: F401
except ImportError:
    pass

import keras  # noqa: E402
import numpy as np  # noqa: E402


def shared_dir():
    """The `../shared` folder, or None when BYOLA_SHARED is unset and it is absent."""
    env = os.environ.get("BYOLA_SHARED")
    if env:
        return pathlib.Path(env)
    default = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
    return default if default.is_dir() else None


@pytest.fixture(scope="session")
def shared():
    """Path to ../shared. Fails (not skips) when BYOLA_SHARED is set and files are missing."""
    path = shared_dir()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("BYOLA_SHARED is not set and ../shared is absent in CI.")
        pytest.skip("../shared not available (set BYOLA_SHARED).")
    if not (path / "reference" / "official_outputs.npz").is_file():
        pytest.fail(f"BYOLA_SHARED={path} does not hold reference/official_outputs.npz.")
    return path


@pytest.fixture(scope="session")
def reference(shared):
    """The official-code fixtures (`official_outputs.npz`) as a dict of arrays."""
    with np.load(shared / "reference" / "official_outputs.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(autouse=True)
def _reset_dtype_policy():
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture(autouse=True, scope="module")
def _clear_session_per_module():
    # Per module, not per test: clear_session's garbage collection costs ~1 s a call.
    yield
    keras.backend.clear_session()


def backend():
    return keras.backend.backend()
