"""`byola_keras.backend.jax_dropout`: the same random bits, mask and outputs as
JAX's Threefry `jax.random` calls that Keras's dropout makes on JAX, without
the rolled loop JAX's CPU lowering runs over the mask.

They call JAX directly (every test environment installs it), so they run
under every Keras backend; the Keras layer that uses them is checked against
Keras's `Dropout` in test_performance_paths.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byola_keras.backend import jax_dropout

KEYS = ([0, 0], [1, 0], [12345, 678], [2**32 - 1, 2**31 + 7])
SHAPES = ((1,), (7,), (3, 5), (4, 24, 33), (2, 3, 4, 5))


@pytest.mark.parametrize("key", KEYS)
def test_random_bits_equal_jax_threefry_bits(key):
    key = jnp.asarray(key, jnp.uint32)
    bits = jax.jit(jax_dropout.random_bits, static_argnums=1)
    for shape in SHAPES:
        expected = np.asarray(jax.random.bits(key, shape, jnp.uint32))
        got = np.asarray(bits(key, shape))
        np.testing.assert_array_equal(got, expected)
        assert len(np.unique(got)) > 0.99 * got.size  # not a constant or a short cycle


def test_threefry_matches_the_published_known_answer():
    """Random123's known-answer vectors for Threefry-2x32, 20 rounds
    (kat_vectors: counter, key -> output)."""
    cases = [
        ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
        ((0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344), (0xC4923A9C, 0x483DF7A0)),
    ]
    for counter, key, expected in cases:
        out = jax_dropout.threefry2x32(
            jnp.asarray(key, jnp.uint32), jnp.asarray([counter[0]], jnp.uint32), jnp.asarray([counter[1]], jnp.uint32)
        )
        assert [int(np.asarray(w)[0]) for w in out] == list(expected)


@pytest.mark.parametrize("keep_prob", [0.7, 0.5, 0.05])
def test_keep_mask_equals_jax_bernoulli(keep_prob):
    key = jnp.asarray([3, 9], jnp.uint32)
    shape = (8, 24, 64)
    expected = np.asarray(jax.random.bernoulli(key, keep_prob, shape))
    got = np.asarray(jax.jit(jax_dropout.keep_mask, static_argnums=(1, 2))(key, keep_prob, shape))
    np.testing.assert_array_equal(got, expected)
    assert abs(got.mean() - keep_prob) < 0.02


def test_dropout_outputs_and_edge_rates():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 12, 40)).astype("float32"))
    seed = jnp.asarray([7, 1], jnp.uint32)
    mask = jax.random.bernoulli(seed, 0.7, x.shape)
    expected = np.where(np.asarray(mask), np.asarray(x) / 0.7, 0.0)
    np.testing.assert_allclose(np.asarray(jax_dropout.dropout(x, 0.3, seed)), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(jax_dropout.dropout(x, 0.0, seed)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(jax_dropout.dropout(x, 1.0, seed)), np.zeros(x.shape))
    with pytest.raises(ValueError, match="2\\*\\*32"):
        jax_dropout.random_bits(seed, (2**16, 2**16))


def test_compiled_mask_is_one_pass_without_a_loop():
    """The reason for the module: JAX's own bits compile to a while loop on a
    CPU; these compile to straight-line fused code."""
    key = jnp.asarray([1, 2], jnp.uint32)
    shape = (16, 24, 128)
    ours = jax.jit(jax_dropout.keep_mask, static_argnums=(1, 2)).lower(key, 0.7, shape).compile().as_text()
    theirs = jax.jit(jax.random.bernoulli, static_argnums=(1, 2)).lower(key, 0.7, shape).compile().as_text()
    assert " while(" in theirs
    assert " while(" not in ours
