"""The BYOL-A learner under model.fit(): EMA target, gradients, loss, saving."""

import keras
import numpy as np
import pytest

from byola_keras.models import BYOLA, AudioNTT2020, AudioNTT2022
from tests.testing import random_log_mel, save_and_load, to_numpy

SHAPE = (16, 24, 1)


def tiny_learner(version="v1", seed=0, **kwargs):
    encoder = AudioNTT2020(d=32, n_mels=16) if version == "v1" else AudioNTT2022(d=256 + 32, n_mels=16)
    model = BYOLA(
        encoder,
        version=version,
        mean=-5.0,
        std=3.0,
        projection_hidden=64,
        projection_dim=16,
        memory_size=32,
        input_shape=SHAPE,
        seed=seed,
        **kwargs,
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


def values(variables):
    return [to_numpy(v).copy() for v in variables]


def test_one_step_updates_online_and_ema_target_exactly():
    model = tiny_learner()
    x = random_log_mel(batch=8, n_mels=16, frames=24)
    target_before = values(model.target_variables)
    online_before = values(model.online_network.trainable_variables)
    for t, o in zip(target_before, online_before):
        np.testing.assert_array_equal(t, o)  # the target starts as a copy
    model.fit(x, batch_size=8, epochs=1, verbose=0)
    online_after = values(model.online_network.trainable_variables)
    target_after = values(model.target_variables)
    assert int(to_numpy(model.optimizer.iterations)) == 1
    tau = np.float32(model.tau)
    for old, new_online, new_target in zip(target_before, online_after, target_after):
        expected = tau * old + np.float32(1.0 - model.tau) * new_online
        # exact up to one float32 rounding (XLA may fuse the multiply-add)
        np.testing.assert_allclose(new_target, expected, rtol=0, atol=1e-7 + 1e-6 * np.abs(expected).max())
    changed = [not np.array_equal(a, b) for a, b in zip(online_before, online_after)]
    assert all(changed), "every online weight should receive a gradient"
    # the target is not trained by the optimizer
    assert not any(v.trainable for v in model.target_variables)
    optimizer_ids = {id(v) for v in model.trainable_variables}
    assert not any(id(v) in optimizer_ids for v in model.target_variables)
    # predictor is trained but has no target twin
    assert len(model.target_variables) == len(model.online_network.trainable_variables)
    assert int(to_numpy(model.augmentation.mixup.memory_filled)) == 8


def test_no_gradients_are_held_between_steps():
    """PyTorch keeps each weight's gradient on the weight (`.grad`) and Keras
    clears it only after the next step's forward pass; the learner drops it
    after each step, and the next step still trains every weight. (JAX and
    TensorFlow hand gradients over as values and keep none.)"""
    model = tiny_learner()
    x = random_log_mel(batch=8, n_mels=16, frames=24)
    model.fit(x, batch_size=8, epochs=1, verbose=0)
    if keras.backend.backend() == "torch":
        assert all(v.value.grad is None for v in model.trainable_variables)
    before = values(model.trainable_variables)
    model.fit(x, batch_size=8, epochs=1, verbose=0)
    assert all(not np.array_equal(a, b) for a, b in zip(before, values(model.trainable_variables)))
    if keras.backend.backend() == "torch":
        assert all(v.value.grad is None for v in model.trainable_variables)


def test_target_batchnorm_statistics_are_not_averaged():
    model = tiny_learner()
    target_paths = {v.path for v in model.target_variables}
    assert not any("moving" in p for p in target_paths)
    x = random_log_mel(batch=8, n_mels=16, frames=24)
    before = to_numpy(model.encoder.get_layer("bn1").moving_mean).copy()
    model.fit(x, batch_size=8, epochs=1, verbose=0)
    assert not np.array_equal(before, to_numpy(model.encoder.get_layer("bn1").moving_mean))


def test_loss_is_symmetric_byol_loss():
    model = tiny_learner()
    rng = np.random.default_rng(0)
    p = rng.normal(size=(8, 16)).astype("float32")
    z = rng.normal(size=(8, 16)).astype("float32")
    loss = float(to_numpy(model.compute_loss(y_pred={"prediction": p, "target": z, "projection": p})))
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    expected = np.mean((2 - 2 * (pn[:4] * zn[4:]).sum(1)) + (2 - 2 * (pn[4:] * zn[:4]).sum(1)))
    assert loss == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.large
def test_loss_falls_on_a_tiny_dataset():
    # Seeded weights; 12 epochs: over 5 initialisations the last two epochs
    # ended at 0.56-0.72 of the first two on PyTorch (8 epochs: up to 0.81).
    keras.utils.set_random_seed(0)
    model = tiny_learner(seed=1)
    x = random_log_mel(batch=64, n_mels=16, frames=24, seed=3)
    history = model.fit(x, batch_size=16, epochs=12, verbose=0).history
    losses = history["loss"]
    assert len(losses) == 12 and np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    assert "embedding_spread" in history and np.isfinite(history["embedding_spread"]).all()


def test_v2_learner_trains_and_uses_the_fader():
    model = tiny_learner(version="v2")
    assert model.augmentation.fader is not None and model.augmentation.alpha == 0.2
    x = random_log_mel(batch=8, n_mels=16, frames=24)
    history = model.fit(x, batch_size=8, epochs=2, verbose=0).history
    assert np.isfinite(history["loss"]).all()


def test_adapt_sets_prenorm_statistics():
    encoder = AudioNTT2020(d=32, n_mels=16)
    model = BYOLA(encoder, projection_hidden=64, projection_dim=16, memory_size=32, input_shape=SHAPE)
    x = random_log_mel(batch=20, n_mels=16, frames=24)
    model.adapt(x)
    assert model.mean == pytest.approx(float(x.mean()), rel=1e-5)
    assert model.std == pytest.approx(float(x.std()), rel=1e-5)


def test_keras_file_round_trip_keeps_everything():
    model = tiny_learner()
    x = random_log_mel(batch=8, n_mels=16, frames=24)
    model.fit(x, batch_size=8, epochs=2, verbose=0)
    restored = save_and_load(model)
    assert isinstance(restored, BYOLA)
    for a, b in zip(model.target_variables, restored.target_variables):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    for a, b in zip(model.trainable_variables, restored.trainable_variables):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    mixup, mixup2 = model.augmentation.mixup, restored.augmentation.mixup
    np.testing.assert_array_equal(to_numpy(mixup.memory), to_numpy(mixup2.memory))
    assert int(to_numpy(mixup2.memory_filled)) == 16
    assert restored.mean == -5.0 and restored.std == 3.0
    assert int(to_numpy(restored.optimizer.iterations)) == 2
    for a, b in zip(model.optimizer.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    # it keeps training
    restored.fit(x, batch_size=8, epochs=1, verbose=0)
    assert int(to_numpy(restored.optimizer.iterations)) == 3
    # the kept encoder embeds any length
    assert tuple(restored.encoder(random_log_mel(2, 16, 40)).shape) == (2, 32)


def test_jit_and_eager_steps_give_the_same_loss():
    """Same seed and data: the compiled step (XLA / jax.jit / torch.compile) and the
    eager step give the same losses. Random draws are taken out (identity crop, no
    mixup, no dropout) because TensorFlow's stateless RNG gives other numbers under
    XLA than eagerly; the randomness itself is covered by the layer tests."""
    x = random_log_mel(batch=16, n_mels=16, frames=24)
    losses = []
    for compiled in (True, False):
        keras.utils.set_random_seed(5)  # same initial weights
        model = BYOLA(
            AudioNTT2020(d=32, n_mels=16, dropout=0.0),
            mean=-5.0, std=3.0, projection_hidden=64, projection_dim=16, input_shape=SHAPE,
            use_mixup=False, virtual_crop_scale=(1.0, 1.0), freq_scale=(1.0, 1.0),
            time_scale=(1.0, 1.0), seed=5,
        )
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3), jit_compile=compiled, run_eagerly=not compiled
        )
        # 8 per view: BatchNorm over fewer samples amplifies float32 rounding
        losses.append(model.fit(x, batch_size=8, epochs=1, verbose=0, shuffle=False).history["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def test_mixed_precision_trains_without_nan():
    policy = "mixed_float16" if keras.backend.backend() == "torch" else "mixed_bfloat16"
    keras.config.set_dtype_policy(policy)
    model = tiny_learner()
    assert model.encoder.get_layer("conv1").compute_dtype != "float32"
    x = random_log_mel(batch=8, n_mels=16, frames=24)
    history = model.fit(x, batch_size=8, epochs=2, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    assert all(v.dtype == "float32" for v in model.target_variables)
    assert str(model.augmentation.mixup.memory.dtype) == "float32"


# -- the official forward: per-view BatchNorm, target in training mode -------------


def _views(batch=8, seed=1):
    # Two views with different statistics, so per-view and joint batch
    # statistics differ.
    rng = np.random.default_rng(seed)
    view1 = rng.normal(0.0, 1.0, (batch, *SHAPE)).astype("float32")
    view2 = rng.normal(0.7, 2.0, (batch, *SHAPE)).astype("float32")
    return view1, view2


def _deterministic_learner(batchnorm="per_view", seed=0):
    keras.utils.set_random_seed(seed)
    encoder = AudioNTT2020(d=32, n_mels=16, dropout=0.0)
    model = BYOLA(
        encoder, mean=-5.0, std=3.0, projection_hidden=64, projection_dim=16,
        memory_size=32, input_shape=SHAPE, seed=seed, batchnorm=batchnorm,
    )
    return model


def _perturb_target(model, seed=2):
    """Target weights that differ from the online ones."""
    rng = np.random.default_rng(seed)
    for v in model.target_variables:
        value = to_numpy(v)
        v.assign(value + rng.normal(0.0, 0.2, value.shape).astype(value.dtype))


def _close(a, b):
    return np.allclose(to_numpy(a), to_numpy(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batchnorm", ["per_view", "joint"])
def test_batchnorm_statistics_per_view_or_joint(batchnorm):
    model = _deterministic_learner(batchnorm)
    _perturb_target(model)
    view1, view2 = _views()
    bn1 = model.encoder.get_layer("bn1")
    conv1 = keras.Model(model.encoder.input, model.encoder.get_layer("conv1").output)
    moving_before = to_numpy(bn1.moving_mean).copy()
    out = model.forward_views(view1, view2, training=True)
    moving_after = to_numpy(bn1.moving_mean).copy()

    # Each view run alone (training mode: batch statistics of that view only).
    online = [model.online_network(v, training=True) for v in (view1, view2)]
    predicted = [model.predictor(p, training=True) for p in online]
    target = [model._target_projections([v], training=True)[0] for v in (view1, view2)]
    halves = {k: np.split(to_numpy(v), 2, axis=0) for k, v in out.items()}
    alone = {"projection": online, "prediction": predicted, "target": target}
    same = {k: [_close(halves[k][i], alone[k][i]) for i in (0, 1)] for k in alone}
    assert not _close(target[0], online[0])  # the target is another network
    if batchnorm == "per_view":
        assert all(all(v) for v in same.values()), same
    else:
        assert not any(any(v) for v in same.values()), same

    # Online moving statistics: two updates (view 1 then view 2) or one (2B batch).
    m = np.float32(bn1.momentum)
    mean1, mean2 = (to_numpy(conv1(v)).mean(axis=(0, 1, 2)) for v in (view1, view2))
    if batchnorm == "per_view":
        expected = m * (m * moving_before + (1 - m) * mean1) + (1 - m) * mean2
    else:
        expected = m * moving_before + (1 - m) * (mean1 + mean2) / 2
    np.testing.assert_allclose(moving_after, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batchnorm", ["per_view", "joint"])
def test_target_is_the_network_with_target_weights_in_training_mode(batchnorm):
    model = _deterministic_learner(batchnorm)
    _perturb_target(model)
    view1, view2 = _views()
    # A separately built network carrying the target weights.
    twin = _deterministic_learner(seed=7).online_network
    for variable, value in zip(twin.trainable_variables, model.target_variables):
        variable.assign(to_numpy(value))
    target = to_numpy(model.forward_views(view1, view2, training=True)["target"])
    if batchnorm == "per_view":
        training = np.concatenate([to_numpy(twin(v, training=True)) for v in (view1, view2)])
        inference = np.concatenate([to_numpy(twin(v, training=False)) for v in (view1, view2)])
    else:
        both = np.concatenate([view1, view2])
        training, inference = to_numpy(twin(both, training=True)), to_numpy(twin(both, training=False))
    np.testing.assert_allclose(target, training, rtol=1e-4, atol=1e-5)
    # A target run in inference mode (moving statistics) would fail the check above.
    assert not np.allclose(target, inference, rtol=1e-4, atol=1e-5)


def test_the_views_loss_terms_add_up_to_the_learners_loss():
    model = _deterministic_learner()
    _perturb_target(model)
    view1, view2 = _views()
    whole = float(to_numpy(model.compute_loss(y_pred=model.forward_views(view1, view2, training=True))))
    z1, z2 = model._target_projections([view1, view2], training=True)
    terms = [model.online_view_loss(v, z) for v, z in ((view1, z2), (view2, z1))]
    p1, p2 = (to_numpy(t[2]) for t in terms)
    assert not np.allclose(p1, p2)
    assert sum(float(to_numpy(t[0])) for t in terms) == pytest.approx(whole, rel=1e-5)


class _ActivityPenalty(keras.layers.Layer):
    """Adds a loss on its input in each call (`add_loss`)."""

    def call(self, x):
        self.add_loss(0.1 * keras.ops.mean(keras.ops.square(x)))
        return x


def _encoder_with_a_layer_loss():
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = _ActivityPenalty()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(32, name="fc")(x))


def _one_sgd_step(per_view_backward, layer_loss=False):
    model = _deterministic_learner()
    if layer_loss:
        keras.utils.set_random_seed(0)
        model = BYOLA(_encoder_with_a_layer_loss(), mean=-5.0, std=3.0, projection_hidden=64,
                      projection_dim=16, memory_size=32, input_shape=SHAPE, seed=0)
    _perturb_target(model)
    model.per_view_backward = per_view_backward
    # SGD: the new weights are linear in the gradients (Adam's first step is
    # about the gradients' signs alone).
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    x = random_log_mel(batch=16, n_mels=16, frames=24, seed=4)
    before = values(model.trainable_variables)
    loss = model.fit(x, batch_size=16, epochs=1, verbose=0, shuffle=False).history["loss"][0]
    return model, before, loss


def test_a_step_one_view_at_a_time_trains_as_kerass_step():
    """With per-view BatchNorm, PyTorch and TensorFlow run each view's backward
    pass before the other view's forward pass and apply the sum of the two
    gradients; the step is Keras's where the learner says it cannot be split
    (JAX always runs Keras's step)."""
    per_view, before, loss = _one_sgd_step(True)
    keras_step, _, keras_loss = _one_sgd_step(False)
    assert per_view.uses_per_view_backward() and not keras_step.uses_per_view_backward()
    assert loss == pytest.approx(keras_loss, rel=1e-5)
    after = values(per_view.trainable_variables)
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))
    for a, b, variable in zip(after, values(keras_step.trainable_variables), per_view.trainable_variables):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=variable.path)
    for a, b in zip(values(per_view.variables), values(keras_step.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # moving statistics, target, bank


def test_a_step_one_view_at_a_time_adds_each_views_layer_losses():
    """A layer's `add_loss` in the encoder: each view's pass adds its own, as
    Keras's step adds both views' (the penalty moves the loss and the conv
    weights, so leaving it out fails the comparison)."""
    per_view, _, loss = _one_sgd_step(True, layer_loss=True)
    keras_step, _, keras_loss = _one_sgd_step(False, layer_loss=True)
    assert per_view.uses_per_view_backward()
    assert loss == pytest.approx(keras_loss, rel=1e-5)
    for a, b in zip(values(per_view.variables), values(keras_step.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_the_step_is_kerass_where_the_loss_is_not_a_sum_over_views():
    assert not _deterministic_learner("joint").uses_per_view_backward()
    regularized = AudioNTT2020(d=32, n_mels=16)
    regularized.get_layer("conv1").kernel.regularizer = keras.regularizers.L2(1e-4)
    model = BYOLA(regularized, mean=-5.0, std=3.0, projection_hidden=64, projection_dim=16,
                  input_shape=SHAPE)
    assert not model.uses_per_view_backward()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = random_log_mel(batch=8, n_mels=16, frames=24)
    history = model.fit(x, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    assert len(model.losses) == 1  # the weight's penalty, in Keras's step's loss


def test_new_config_keys_round_trip_and_old_configs_load_as_joint_keras():
    model = _deterministic_learner("joint")
    assert model.init == "torch" and model.encoder.init == "torch"
    config = model.get_config()
    assert config["batchnorm"] == "joint" and config["init"] == "torch"
    restored = BYOLA.from_config(config)
    assert restored.batchnorm == "joint" and restored.init == "torch"
    old = {k: v for k, v in config.items() if k not in ("batchnorm", "init")}
    old["encoder"] = dict(old["encoder"], config={
        k: v for k, v in old["encoder"]["config"].items() if k != "init"
    })
    legacy = BYOLA.from_config(old)
    assert legacy.batchnorm == "joint" and legacy.init == "keras" and legacy.encoder.init == "keras"
    with pytest.raises(ValueError, match="batchnorm"):
        BYOLA(AudioNTT2020(d=32, n_mels=16), input_shape=SHAPE, batchnorm="views")


def test_build_learner_defaults_are_the_official_ones():
    from byola_keras.pretrain import build_learner, resolve_settings

    shape = (64, 16, 1)
    settings = resolve_settings(dim=32)
    model = build_learner(settings, -5.0, 3.0, input_shape=shape, projection_hidden=32, projection_dim=8)
    assert float(model.optimizer.epsilon) == 1e-8
    assert model.batchnorm == "per_view" and model.init == "torch" and model.encoder.init == "torch"
    settings = resolve_settings(dim=32, batchnorm="joint", init="keras", adam_epsilon=1e-7)
    model = build_learner(settings, -5.0, 3.0, input_shape=shape, projection_hidden=32, projection_dim=8)
    assert float(model.optimizer.epsilon) == 1e-7
    assert model.batchnorm == "joint" and model.init == "keras" and model.encoder.init == "keras"
    with pytest.raises(ValueError, match="init"):
        resolve_settings(init="xavier")


@pytest.mark.parametrize("batchnorm", ["per_view", "joint"])
def test_compiled_fit_step_updates_online_moving_statistics_once_per_call(batchnorm):
    # No random augmentation (no mixup, identity crop, no dropout): both views
    # are the same, so the online BatchNorm sees the same batch mean in each
    # call: two calls (per view) give m^2 m0 + (1 - m^2) mu, one call (joint)
    # m m0 + (1 - m) mu.
    keras.utils.set_random_seed(3)
    model = BYOLA(
        AudioNTT2020(d=32, n_mels=16, dropout=0.0),
        mean=-5.0, std=3.0, projection_hidden=64, projection_dim=16, input_shape=SHAPE,
        use_mixup=False, virtual_crop_scale=(1.0, 1.0), freq_scale=(1.0, 1.0),
        time_scale=(1.0, 1.0), seed=3, batchnorm=batchnorm,
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    x = random_log_mel(batch=8, n_mels=16, frames=24)
    view1, view2 = (to_numpy(v) for v in model.augmentation(x, training=True))
    np.testing.assert_allclose(view1, view2, atol=1e-6)
    conv1 = keras.Model(model.encoder.input, model.encoder.get_layer("conv1").output)
    mu = to_numpy(conv1(view1)).mean(axis=(0, 1, 2))
    bn1 = model.encoder.get_layer("bn1")
    m = np.float32(bn1.momentum)
    before = to_numpy(bn1.moving_mean).copy()
    model.fit(x, batch_size=8, epochs=1, verbose=0, shuffle=False)
    calls = 2 if batchnorm == "per_view" else 1
    expected = m**calls * before + (1 - m**calls) * mu
    np.testing.assert_allclose(to_numpy(bn1.moving_mean), expected, rtol=1e-4, atol=1e-6)
