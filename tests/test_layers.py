"""Front-end and augmentation layers: shapes, config and `.keras` round trips,
a compiled fit step, determinism, training flag, and parity with the official
code's outputs (the `reference` fixture: skipped without BYOLA_SHARED)."""

import keras
import numpy as np
import pytest
from keras import ops

from byola_keras import frontend
from byola_keras.layers import (
    AugmentationModule,
    LogMelSpectrogram,
    LogMixupExp,
    PostNorm,
    PreNorm,
    RandomLinearFader,
    RandomResizeCrop,
)
from tests.testing import TestCase, assert_config_round_trip, random_log_mel, to_numpy

AUGMENTATIONS = [
    lambda: PreNorm(mean=-5.0, std=3.0),
    lambda: LogMixupExp(alpha=0.4, memory_size=8, seed=1),
    lambda: RandomResizeCrop(seed=1),
    lambda: RandomLinearFader(seed=1),
    lambda: PostNorm(),
]


# --- front-end ----------------------------------------------------------------------
def test_mel_filterbanks_match_librosa_and_torchaudio(reference):
    np.testing.assert_allclose(frontend.mel_filterbank(), reference["mel_fb_librosa_slaney"], atol=1e-7)
    np.testing.assert_allclose(
        frontend.mel_filterbank(htk=True), reference["mel_fb_torchaudio_htk"], atol=1e-5
    )


@pytest.mark.parametrize("htk, key", [(False, "lms_librosa_reflectpad"), (True, "lms_torchaudio")])
def test_log_mel_matches_official_frontends(reference, htk, key):
    layer = LogMelSpectrogram(htk=htk)
    out = to_numpy(layer(reference["wave"][None]))
    assert out.shape == (1, 64, 101, 1)
    np.testing.assert_allclose(out[0, :, :, 0], reference[key], atol=1e-3)
    # The host-side front-end used by the data pipeline agrees too.
    np.testing.assert_allclose(frontend.log_mel_numpy(reference["wave"], htk=htk), reference[key], atol=1e-3)


def test_log_mel_lengths_and_config():
    layer = LogMelSpectrogram()
    out = layer(np.zeros((3, 15200), "float32"))
    assert tuple(out.shape) == (3, 64, 96, 1)
    assert np.isfinite(to_numpy(out)).all()  # silence stays finite: log(eps)
    np.testing.assert_allclose(to_numpy(out), np.log(frontend.LOG_EPS), rtol=1e-6)
    assert layer.compute_output_shape((None, 16000)) == (None, 64, 101, 1)
    clone = assert_config_round_trip(LogMelSpectrogram(htk=True, f_max=7000.0))
    assert clone.htk and clone.f_max == 7000.0


def test_log_mel_symbolic_variable_length():
    inputs = keras.Input((None,))
    outputs = LogMelSpectrogram()(inputs)
    assert tuple(outputs.shape) == (None, 64, None, 1)


# --- what every layer promises (tests.testing.TestCase) -----------------------------
SEED = "seed_generator_state"


class TestLayers(TestCase):
    @pytest.mark.parametrize(
        "make, state",
        [
            (lambda: PreNorm(mean=-5.0, std=3.0), ()),
            (lambda: LogMixupExp(alpha=0.4, memory_size=8, seed=1), ("memory_filled", "memory", SEED)),
            (lambda: RandomResizeCrop(seed=1), (SEED,)),
            (lambda: RandomLinearFader(seed=1), (SEED,)),
            (lambda: PostNorm(), ()),
        ],
        ids=["pre_norm", "mixup", "resize_crop", "fader", "post_norm"],
    )
    def test_augmentation_layer(self, make, state):
        layer = self.run_layer_test(make, random_log_mel(batch=4), fit_state=state)
        x = random_log_mel(batch=4, seed=1)
        # Augmentations are the identity outside training.
        np.testing.assert_array_equal(to_numpy(layer(x, training=False)), x)
        np.testing.assert_array_equal(to_numpy(layer(x)), x)

    def test_augmentation_module(self):
        self.run_layer_test(
            lambda: AugmentationModule(version="v2", mean=-5.0, std=3.0, memory_size=16, seed=0),
            random_log_mel(batch=4),
            fit_state=("memory_filled", SEED),
        )

    @pytest.mark.parametrize("htk", [False, True], ids=["slaney", "htk"])
    def test_log_mel_spectrogram(self, htk):
        wave = np.random.default_rng(0).normal(0.0, 0.1, (2, 4000)).astype("float32")
        frames = 1 + 4000 // frontend.HOP_LENGTH
        self.run_layer_test(lambda: LogMelSpectrogram(htk=htk), wave, expected_shape=(2, 64, frames, 1), atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LogMixupExp(alpha=0.4, memory_size=8, seed=7),
        lambda: RandomResizeCrop(seed=7),
        lambda: RandomLinearFader(seed=7),
    ],
)
def test_seeded_runs_repeat_and_draws_are_per_sample(make):
    x = random_log_mel(batch=6)
    x_same = np.repeat(x[:1], 6, axis=0)
    outs = []
    for _ in range(2):
        layer = make()
        layer(x, training=True)  # (fills the mixup bank)
        outs.append(to_numpy(layer(x_same, training=True)))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
    # identical inputs in one batch get different random parameters
    assert not np.allclose(outs[0][0], outs[0][1], atol=1e-4)


# --- parity with the official augmentations -----------------------------------------
def test_mixup_matches_official(reference):
    x = reference["aug_x"][..., None]
    z = reference["aug_z"][..., None]
    lam = np.array([reference["mixup_lambda"]], "float32")
    out = to_numpy(LogMixupExp.mix(x, z, lam))
    np.testing.assert_allclose(out, reference["mixup_out"][..., None], atol=1e-4)


def test_resize_crop_matches_official(reference):
    params = reference["rrc_params_ijhw"].astype("float32")
    x = np.repeat(reference["aug_x"][..., None], len(params), axis=0)
    out = to_numpy(RandomResizeCrop().apply_params(x, params))
    np.testing.assert_allclose(out, reference["rrc_out"].transpose(0, 2, 3, 1), atol=1e-4)


def test_resize_crop_differs_from_keras_bicubic(reference):
    """The reason the layer does its own resampling: Keras's bicubic is another kernel."""
    i, j, h, w = reference["rrc_params_ijhw"][0]
    canvas = np.pad(reference["aug_x"][0], ((0, 0), (24, 24)))
    crop = canvas[i : i + h, j : j + w][None, ..., None]
    keras_out = to_numpy(ops.image.resize(crop, (64, 96), interpolation="bicubic"))
    assert np.abs(keras_out[0, ..., 0] - reference["rrc_out"][0, 0]).max() > 0.1


def test_resize_crop_params_in_range():
    layer = RandomResizeCrop(seed=3)
    p = to_numpy(layer.draw_params(512, 64, 96))
    i, j, h, w = p.T
    assert (h >= 1).all() and (h <= 64).all() and (w >= 1).all() and (w <= 144).all()
    assert (i >= 0).all() and (i + h <= 64).all() and (j >= 0).all() and (j + w <= 144).all()
    assert np.allclose(p, np.round(p))
    assert 0.6 * 96 - 1 <= w.min() and w.max() <= 1.5 * 96
    assert len(np.unique(w)) > 20  # per-sample draws


def _bicubic_crop_reference(x, i, j, h, w, canvas_h, canvas_w):
    """NumPy, one sample: crop the zero-padded canvas, then resize the crop back
    with PyTorch's bicubic (align_corners=True, a=-0.75, clamped taps)."""
    height, width = x.shape
    canvas = np.zeros((canvas_h, canvas_w))
    top, left = (canvas_h - height) // 2, (canvas_w - width) // 2
    canvas[top : top + height, left : left + width] = x
    crop = canvas[i : i + h, j : j + w]

    def cubic(d):
        d, a = abs(d), -0.75
        if d <= 1:
            return ((a + 2) * d - (a + 3)) * d * d + 1
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a if d < 2 else 0.0

    def matrix(out_len, in_len):
        m = np.zeros((out_len, in_len))
        for o in range(out_len):
            src = o * (in_len - 1) / (out_len - 1)
            base = int(np.floor(src))
            for k in (-1, 0, 1, 2):
                m[o, min(max(base + k, 0), in_len - 1)] += cubic(src - (base + k))
        return m

    return matrix(height, h) @ crop @ matrix(width, w).T


def test_resize_crop_matches_a_per_sample_numpy_resize():
    """The batched gather formulation against a plain per-sample crop + resize,
    on random crops and on the extremes (1-pixel crops, whole canvas, edges)."""
    layer = RandomResizeCrop(virtual_crop_scale=(1.25, 1.5), freq_scale=(0.2, 1.6), time_scale=(0.2, 1.6), seed=4)
    height, width = 12, 20
    canvas_h, canvas_w = layer.canvas_size(height, width)
    params = to_numpy(layer.draw_params(40, height, width))
    extremes = [[0, 0, 1, 1], [canvas_h - 1, canvas_w - 1, 1, 1], [0, 0, canvas_h, canvas_w],
                [canvas_h - 2, 0, 2, canvas_w], [0, canvas_w - 3, canvas_h, 3]]
    params = np.concatenate([params, np.array(extremes, "float32")])
    x = random_log_mel(batch=len(params), n_mels=height, frames=width, seed=5)
    out = to_numpy(layer.apply_params(x, params))
    expected = np.stack([
        _bicubic_crop_reference(x[b, :, :, 0], *map(int, params[b]), canvas_h, canvas_w)
        for b in range(len(params))
    ])
    np.testing.assert_allclose(out[..., 0], expected, atol=1e-4)


def test_identity_crop_is_identity():
    x = random_log_mel(batch=2, n_mels=16, frames=24)
    params = np.array([[0, 6, 16, 24]] * 2, "float32")  # canvas 16 x 36, input at 6..29
    out = to_numpy(RandomResizeCrop().apply_params(x, params))
    np.testing.assert_allclose(out, x, atol=1e-5)


def test_fader_matches_official(reference):
    x = reference["aug_x"][..., None]
    out = to_numpy(RandomLinearFader().apply_params(x, reference["rlf_head_tail"][None]))
    np.testing.assert_allclose(out, reference["rlf_out"][..., None], atol=1e-4)


def test_post_norm_matches_official(reference):
    x = reference["normbatch_in"].transpose(0, 2, 3, 1)
    out = to_numpy(PostNorm()(x, training=True))
    np.testing.assert_allclose(out, reference["normbatch_out"].transpose(0, 2, 3, 1), atol=1e-4)


# --- PreNorm ---------------------------------------------------------------------------
def test_pre_norm_adapt_array_and_batches():
    rng = np.random.default_rng(0)
    x = rng.normal(-4.0, 2.5, (40, 8, 12, 1)).astype("float32")
    layer = PreNorm()
    layer.adapt(x)
    assert layer.mean == pytest.approx(float(x.mean()), rel=1e-5)
    assert layer.std == pytest.approx(float(x.std()), rel=1e-5)
    batched = PreNorm()
    batched.adapt([x[:10], (x[10:25], None), x[25:]])
    assert batched.mean == pytest.approx(layer.mean, rel=1e-6)
    assert batched.std == pytest.approx(layer.std, rel=1e-6)
    y = to_numpy(layer(x, training=True))
    assert abs(y.mean()) < 1e-4 and abs(y.std() - 1.0) < 1e-4
    assert assert_config_round_trip(layer).mean == layer.mean


def test_pre_norm_rejects_bad_statistics():
    with pytest.raises(ValueError, match="std"):
        PreNorm(mean=0.0, std=0.0)
    with pytest.raises(ValueError, match="both"):
        PreNorm(mean=1.0)


# --- LogMixupExp memory bank -----------------------------------------------------------
def test_mixup_passes_first_batch_then_mixes_with_the_bank():
    layer = LogMixupExp(alpha=1.0, memory_size=6, seed=0)
    first = random_log_mel(batch=4, seed=1)
    np.testing.assert_allclose(to_numpy(layer(first, training=True)), first, atol=1e-6)
    assert int(to_numpy(layer.memory_filled)) == 4
    second = random_log_mel(batch=4, seed=2)
    out = to_numpy(layer(second, training=True))
    assert not np.allclose(out, second, atol=1e-3)
    # FIFO: 8 pushed into 6 slots -> slots 4, 5, 0, 1 hold the second batch
    memory = to_numpy(layer.memory)
    np.testing.assert_allclose(memory[4:6], second[:2], atol=1e-6)
    np.testing.assert_allclose(memory[:2], second[2:], atol=1e-6)
    np.testing.assert_allclose(memory[2:4], first[2:], atol=1e-6)
    assert int(to_numpy(layer.memory_filled)) == 6
    assert int(to_numpy(layer.memory_pointer)) == 2


def _jit_stateless(layer):
    """`layer`'s call as a compiled pure function of its non-trainable state
    (JAX: jax.jit; TensorFlow: XLA; PyTorch: the functional path, uncompiled)."""

    def step(variables, x):
        return layer.stateless_call([], variables, x, training=True)

    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(step)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(step, jit_compile=True)
    return step


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_memory_bank_is_a_fifo_ring_for_any_batch_sizes(compiled):
    """Batches that divide the bank, that wrap around its end, that fill it
    whole: the bank always holds the newest rows at their ring positions."""
    size, sizes = 7, [3, 5, 7, 2, 6, 1, 4, 7]
    rng = np.random.default_rng(0)
    layer = LogMixupExp(alpha=0.4, memory_size=size, seed=0)
    layer.build((None, 2, 3, 1))
    step = _jit_stateless(layer) if compiled else None
    variables = [v.value for v in layer.non_trainable_variables]
    names = [v.name for v in layer.non_trainable_variables]
    expected, pointer, filled = np.zeros((size, 2, 3, 1), "float32"), 0, 0
    for n in sizes:
        batch = rng.normal(size=(n, 2, 3, 1)).astype("float32")
        if compiled:
            _, variables = step(variables, batch)
            state = {name: to_numpy(v) for name, v in zip(names, variables)}
        else:
            layer(batch, training=True)
            state = {v.name: to_numpy(v) for v in layer.non_trainable_variables}
        for row in batch:
            expected[pointer] = row
            pointer, filled = (pointer + 1) % size, min(filled + 1, size)
        np.testing.assert_array_equal(state["memory"], expected)
        assert int(state["memory_pointer"]) == pointer and int(state["memory_filled"]) == filled


def test_mixup_views_mix_each_sample_independently_and_push_it_once():
    layer = LogMixupExp(alpha=1.0, memory_size=32, seed=0)
    layer(random_log_mel(batch=8, seed=1), training=True)
    x = random_log_mel(batch=4, seed=2)
    out = to_numpy(layer(x, training=True, views=2))
    assert out.shape == (8,) + x.shape[1:]
    assert int(to_numpy(layer.memory_filled)) == 12  # the 4 new samples, once
    np.testing.assert_array_equal(to_numpy(layer.memory)[8:12], x)
    assert not np.allclose(out[:4], out[4:], atol=1e-3)  # independent draws per view
    # views=2 is mix() of the repeated batch, and the identity when not training
    z = random_log_mel(batch=8, seed=3)
    lam = np.linspace(0.0, 0.9, 8).astype("float32")
    np.testing.assert_allclose(
        to_numpy(LogMixupExp.mix(x, z, lam, views=2)),
        to_numpy(LogMixupExp.mix(np.concatenate([x, x]), z, lam)),
        atol=1e-6,
    )
    np.testing.assert_array_equal(to_numpy(layer(x, training=False, views=2)), np.concatenate([x, x]))
    with pytest.raises(ValueError, match="views"):
        layer(x, training=True, views=0)


def test_mixup_background_comes_from_earlier_inputs():
    """With lambda bounded by alpha, output = log((1-l)e^x + l e^z): solve for z."""
    layer = LogMixupExp(alpha=0.5, memory_size=4, seed=0)
    bank = np.full((4, 2, 3, 1), 2.0, "float32")
    layer(bank, training=True)
    x = np.zeros((3, 2, 3, 1), "float32")
    out = to_numpy(layer(x, training=True))
    lam = (np.exp(out[:, 0, 0, 0]) - 1.0) / (np.exp(2.0) - 1.0)
    assert ((lam >= 0) & (lam <= 0.5)).all()
    np.testing.assert_allclose(out, np.log(1 - lam + lam * np.exp(2.0))[:, None, None, None] * np.ones_like(x), atol=1e-4)


def test_augmentation_module_two_views():
    x = random_log_mel(batch=4)
    module = AugmentationModule(version="v2", mean=-5.0, std=3.0, memory_size=16, seed=0)
    v1, v2 = module(x, training=True)
    assert tuple(v1.shape) == x.shape and tuple(v2.shape) == x.shape
    both = np.concatenate([to_numpy(v1), to_numpy(v2)])
    assert abs(both.mean()) < 1e-4 and abs(both.std(ddof=1) - 1.0) < 1e-3  # post-norm over both views
    assert not np.allclose(to_numpy(v1), to_numpy(v2), atol=1e-3)
    assert int(to_numpy(module.mixup.memory_filled)) == 4  # each segment pushed once
    assert module.fader is not None and module.alpha == 0.2
    v1_off, _ = module(x, training=False)
    np.testing.assert_array_equal(to_numpy(v1_off), x)
    clone = assert_config_round_trip(module)
    assert clone.pre_norm.mean == -5.0
    v1_default = AugmentationModule(version="v1")
    assert v1_default.fader is None and v1_default.alpha == 0.4


def test_augmentation_module_ablation_switches():
    x = random_log_mel(batch=4)
    module = AugmentationModule(
        use_mixup=False, use_resize_crop=False, use_pre_norm=False, use_post_norm=False
    )
    v1, v2 = module(x, training=True)
    np.testing.assert_allclose(to_numpy(v1), x, atol=1e-6)
    np.testing.assert_allclose(to_numpy(v2), x, atol=1e-6)


def test_augmentations_jit_compile():
    module = AugmentationModule(mean=-5.0, std=3.0, memory_size=16, seed=0)
    x = random_log_mel(batch=4)
    module.build(x.shape)
    step = _jit_stateless(module)
    variables = [v.value for v in module.non_trainable_variables]
    (v1, v2), variables = step(variables, x)
    (v1, v2), variables = step(variables, x)
    assert np.isfinite(to_numpy(v1)).all()
    filled_index = [v.name for v in module.non_trainable_variables].index("memory_filled")
    assert int(to_numpy(variables[filled_index])) == 8
