"""Test configuration: one backend per process, chosen by KERAS_BACKEND.

torch is imported before TensorFlow (the reverse order can segfault). JAX's
kernel-gradient formulation is fixed (see below). Tests
that compare with the official BYOL-A code's outputs read the reference folder
named by BYOLA_SHARED through the `shared` / `reference` fixtures: they skip
when it is unset (a fresh clone) and fail when it is set but incomplete
(`.ci/run` sets it and checks the folder first).
"""

import os
import pathlib

import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX picks the convolutions' kernel gradient by timing both formulations
# (`byola_keras.backend.autotune`); tests (and the runs they start) use one
# fixed formulation, so that no result depends on timing. test_autotune
# removes it to test the choice itself.
os.environ.setdefault("BYOLA_AUTOTUNE_CONV_WEIGHT_GRAD", "patches")

try:  # noqa: SIM105
    import torch  # noqa: F401
except ImportError:
    pass

import keras  # noqa: E402
import numpy as np  # noqa: E402


SHARED_ENV = "BYOLA_SHARED"
OFFICIAL_OUTPUTS = pathlib.Path("reference") / "official_outputs.npz"
SKIP_REASON = (
    "compares with the official BYOL-A code's outputs; set BYOLA_SHARED to the "
    "reference folder (holding reference/official_outputs.npz) to run it"
)


def shared_dir():
    """The reference folder named by BYOLA_SHARED, or None when it is unset."""
    env = os.environ.get(SHARED_ENV, "").strip()
    return pathlib.Path(env) if env else None


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "official_reference: compares with the official code's outputs (skips without BYOLA_SHARED)",
    )


def pytest_collection_modifyitems(config, items):
    # Every test that reads the reference folder is marked, so that
    # `-m "not official_reference"` selects the self-contained ones.
    for item in items:
        if "shared" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.official_reference)


@pytest.fixture(scope="session")
def shared():
    """The reference folder (BYOLA_SHARED).

    Unset: the test skips, saying why (a fresh clone has no reference folder).
    Set but without the official outputs: the test fails (CI sets it).
    """
    path = shared_dir()
    if path is None:
        pytest.skip(SKIP_REASON)
    if not (path / OFFICIAL_OUTPUTS).is_file():
        pytest.fail(f"{SHARED_ENV}={path} does not hold {OFFICIAL_OUTPUTS}.")
    return path


@pytest.fixture(scope="session")
def reference(shared):
    """The official-code fixtures (`official_outputs.npz`) as a dict of arrays."""
    with np.load(shared / OFFICIAL_OUTPUTS) as data:
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
