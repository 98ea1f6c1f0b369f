"""What the command line does once per process or per machine, and what it
keeps between runs: seeding without importing TensorFlow on the other
backends, the augmentation image as one compiled program, JAX's persistent
compilation cache, and the one cache folder."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from byola_keras import _files
from byola_keras import pretrain as pretrain_lib
from byola_keras import run_logging
from byola_keras import seeding
from byola_keras.backend import compile_cache, stateless

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, env=None):
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**inherited, "PYTHONPATH": REPO, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_seeding_imports_tensorflow_only_on_its_backend(backend):
    """`keras.utils.set_random_seed` imports TensorFlow whenever it is
    installed (it is here); ours only on the TensorFlow backend."""
    code = (
        "import sys, keras\n"
        "from byola_keras import seeding\n"
        "assert 'tensorflow' not in sys.modules or keras.backend.backend() == 'tensorflow'\n"
        "seeding.set_random_seed(3)\n"
        "print('tensorflow' in sys.modules)\n"
        "keras.utils.set_random_seed(3)\n"
        "print('tensorflow' in sys.modules)\n"
    )
    ours, keras_own = _python(code, {"KERAS_BACKEND": backend}).split()
    assert keras_own == "True"  # the control: TensorFlow is installed and Keras imports it
    assert ours == ("True" if backend == "tensorflow" else "False")


def test_seeding_seeds_like_keras():
    """Python, NumPy and Keras's unseeded random ops draw the same numbers
    after ours as after `keras.utils.set_random_seed`, and other numbers
    after another seed."""
    import random

    def draws(seed_with, seed):
        keras.backend.clear_session()
        seed_with(seed)
        unseeded = keras.ops.convert_to_numpy(keras.random.uniform((5,)))
        return random.random(), float(np.random.rand()), unseeded

    for seed in (0, 7):
        ours, theirs = draws(seeding.set_random_seed, seed), draws(keras.utils.set_random_seed, seed)
        assert ours[:2] == theirs[:2]
        np.testing.assert_array_equal(ours[2], theirs[2])
    other = draws(seeding.set_random_seed, 1)
    assert other[:2] != draws(seeding.set_random_seed, 0)[:2]
    from keras.src.utils import rng_utils

    seeding.set_random_seed(5)
    assert rng_utils.get_random_seed() == 5  # read by keras.distribution.initialize on JAX


def test_augmentation_image_is_one_program_on_jax():
    """On JAX the views are drawn by one compiled program, compiled once and
    reused; they equal the eager `stateless_call`'s."""
    settings = pretrain_lib.resolve_settings(dim=16, batch_size=4, memory_size=8)
    model = pretrain_lib.build_learner(settings, mean=-5.0, std=3.0, projection_hidden=16, projection_dim=8)
    x = np.random.default_rng(0).normal(-5, 3, (4, 64, 96, 1)).astype("float32")
    model.augmentation(x, training=True)
    augmentation = model.augmentation
    state = ([v.value for v in augmentation.trainable_variables], [v.value for v in augmentation.non_trainable_variables])
    (eager1, eager2), _ = augmentation.stateless_call(*state, x[:1], training=True)
    (view1, view2), _ = stateless.stateless_call(augmentation, *state, x[:1], training=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(view1), keras.ops.convert_to_numpy(eager1), atol=1e-4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(view2), keras.ops.convert_to_numpy(eager2), atol=1e-4)
    if keras.backend.backend() != "jax":
        assert augmentation not in stateless._COMPILED  # eager kernels elsewhere
        return
    import jax

    compiled = stateless._COMPILED[augmentation][(("training", True),)]
    run_logging.augmentation_image(model, x[:1])
    traced = compiled._cache_size()
    run_logging.augmentation_image(model, x[:1])
    assert traced >= 1 and compiled._cache_size() == traced  # reused, not traced again
    assert isinstance(compiled, type(jax.jit(lambda a: a)))


def test_compilation_cache_env(monkeypatch, tmp_path):
    """JAX's cache folder is set for the JAX backend only, under the cache
    root, and never over the user's own choice or opt-out."""
    monkeypatch.setenv("BYOLA_KERAS_CACHE", str(tmp_path))
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE", compile_cache.DISABLE_ENV):
        monkeypatch.setenv(name, "")  # recorded, so that what enable_for_jax sets is undone
        monkeypatch.delenv(name)
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    assert compile_cache.enable_for_jax() is None and "JAX_COMPILATION_CACHE_DIR" not in os.environ
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    monkeypatch.setenv(compile_cache.DISABLE_ENV, "off")
    assert compile_cache.enable_for_jax() is None and "JAX_COMPILATION_CACHE_DIR" not in os.environ
    monkeypatch.delenv(compile_cache.DISABLE_ENV)
    path = compile_cache.enable_for_jax()
    assert path == os.path.join(str(tmp_path), "jax-compilation-cache") == os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] == str(compile_cache.MAX_BYTES)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.enable_for_jax() is None
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "mine")


def test_a_second_process_loads_the_compiled_program(tmp_path):
    """Through the command line's setting, one process stores a compiled
    program and the next loads it instead of compiling (JAX's cache-hit
    counter), in real processes."""
    code = (
        "import os, json\n"
        "from byola_keras.backend import compile_cache\n"
        "path = compile_cache.enable_for_jax()\n"
        "import jax, jax.numpy as jnp\n"
        "from jax._src import monitoring\n"
        "hits = []\n"
        "monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name == '/jax/compilation_cache/cache_hits' else None)\n"
        "f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())\n"
        "print(json.dumps({'path': path, 'value': float(f(jnp.ones((64, 64)))), 'hits': len(hits)}))\n"
    )
    env = {
        "KERAS_BACKEND": "jax", "BYOLA_KERAS_CACHE": str(tmp_path),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # store even this small program
    }
    first = json.loads(_python(code, env).strip().splitlines()[-1])
    assert first["path"] == str(tmp_path / "jax-compilation-cache") and first["hits"] == 0
    assert os.listdir(first["path"])
    second = json.loads(_python(code, env).strip().splitlines()[-1])
    assert second["hits"] >= 1 and second["value"] == first["value"]
    off = json.loads(_python(code, {**env, "BYOLA_COMPILATION_CACHE": "off"}).strip().splitlines()[-1])
    assert off["path"] is None and off["hits"] == 0


def test_one_cache_root(monkeypatch, tmp_path):
    """The built-in corpus, embeddings and autotune choices share one folder:
    `$BYOLA_KERAS_CACHE`, else `byola-keras` under `$XDG_CACHE_HOME`."""
    from byola_keras.backend import autotune
    from byola_keras.data import default_corpus
    from byola_keras.evaluation import embedding

    monkeypatch.delenv("BYOLA_KERAS_CACHE", raising=False)
    monkeypatch.delenv("BYOLA_AUTOTUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = str(tmp_path / "xdg" / "byola-keras")
    assert _files.cache_root() == root
    assert autotune.cache_path() == os.path.join(root, "autotune.json")
    assert embedding.default_cache_dir() == os.path.join(root, "embeddings")
    corpus = default_corpus.make_default_corpus(num_clips=8)
    assert os.path.dirname(corpus) == root
    monkeypatch.setenv("BYOLA_KERAS_CACHE", str(tmp_path / "mine"))
    assert _files.cache_root() == str(tmp_path / "mine")
