"""The fast paths stay correct: multi-device data parallelism, mixed precision,
the backend-tuned conv-block layers, the memory bank written in place and
compiled once for every bank position.

(jit vs eager and "mixed precision trains without NaN" are in test_byola.py.)
The data-parallel checks run in a subprocess, because the device count must be
fixed before the backend initialises, and so do the checks of one backend's
compiled program run from another: this file is also the worker script
(`python -m tests.test_performance_paths BACKEND`).
"""

import inspect
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from byola_keras import distribute
from byola_keras.layers import AugmentationModule, LogMelSpectrogram, LogMixupExp, PostNorm, PreNorm
from byola_keras.backend import conv as _fast_layers
from byola_keras.models import AudioNTT2020
from tests.testing import random_log_mel, save_and_load, to_numpy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 24, 1)


# --- 2-device data parallel vs. 1 device -------------------------------------------
def _learner(augment=True):
    from byola_keras.models import BYOLA

    keras.utils.set_random_seed(0)
    flags = {} if augment else {"use_mixup": False, "use_resize_crop": False, "use_post_norm": False}
    model = BYOLA(
        AudioNTT2020(d=32, n_mels=16, dropout=0.3 if augment else 0.0),
        mean=-5.0,
        std=3.0,
        projection_hidden=64,
        projection_dim=16,
        memory_size=32,
        input_shape=SHAPE,
        seed=0,
        **flags,
    )
    # SGD: weight differences then follow gradient differences (Adam's first
    # steps are close to sign(gradient) and would hide a wrong scale).
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    return model


def _train(model, x, steps=2):
    history = model.fit(x, batch_size=len(x), epochs=steps, verbose=0, shuffle=False).history
    return {
        "loss": [float(v) for v in history["loss"]],
        "trainable": [to_numpy(v).tolist() for v in model.trainable_variables],
        "target": [to_numpy(v).tolist() for v in model.target_variables],
        "memory_filled": int(to_numpy(model.augmentation.mixup.memory_filled))
        if model.augmentation.use_mixup
        else None,
        "iterations": int(to_numpy(model.optimizer.iterations)),
    }


def _replica_values(strategy, variable):
    return [np.asarray(t) for t in strategy.experimental_local_results(variable.value)]


def _worker(backend):
    """Runs in a fresh process with 2 host devices; prints one JSON line."""
    distribute.host_devices(2)
    out = {}
    if backend == "jax":
        import jax

        x = random_log_mel(batch=8, n_mels=16, frames=24)
        out["one"] = _train(_learner(), x)  # default: first device only
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
        model = _learner()
        out["two"] = _train(model, x)
        out["sharded"] = dict(model.trainable_variables[0].value.sharding.mesh.shape)
    else:  # tensorflow
        import tensorflow as tf

        # Per-replica batch statistics and random draws equal the global ones
        # only when each replica sees the same data and the draws play no part:
        # identical halves, augmentation and dropout off.
        half = random_log_mel(batch=4, n_mels=16, frames=24)
        x = np.concatenate([half, half])
        out["one"] = _train(_learner(augment=False), x)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = _learner(augment=False)
        out["two"] = _train(model, x)
        # With augmentation on: the replicas stay in sync.
        with strategy.scope():
            model = _learner()
        x = random_log_mel(batch=8, n_mels=16, frames=24, seed=1)
        result = _train(model, x)
        mixup = model.augmentation.mixup
        banks = _replica_values(strategy, mixup.memory)
        targets = _replica_values(strategy, model.target_variables[0])
        seeds = _replica_values(strategy, mixup.seed_generator.state)
        filled = _replica_values(strategy, mixup.memory_filled)
        # the bank holds the global batches, in global order, as on one device
        first = model.augmentation.pre_norm
        expected = (x - first.mean) / first.std
        out["replicas"] = {
            "loss": result["loss"],
            "banks_equal": all(np.array_equal(banks[0], b) for b in banks[1:]),
            "bank_holds_global_batch": bool(np.allclose(banks[0][8:16], expected, atol=1e-5)),
            "targets_equal": all(np.array_equal(targets[0], t) for t in targets[1:]),
            "seeds_equal": all(np.array_equal(seeds[0], s) for s in seeds[1:]),
            "filled": [int(f) for f in filled],
        }
    print("RESULT " + json.dumps(out))


def _run_worker(backend, **extra_env):
    worker_backends = {"bank-copies": "jax", "tf-programs": "tensorflow", "tf-onednn-nan": "tensorflow"}
    env = dict(os.environ, KERAS_BACKEND=worker_backends.get(backend, backend), **extra_env)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_performance_paths", backend],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _assert_same_step(one, two):
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-3)
    assert two["iterations"] == one["iterations"] == 2
    for name in ("trainable", "target"):
        for a, b in zip(one[name], two[name]):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-3)
    assert two["memory_filled"] == one["memory_filled"]


def test_two_device_data_parallel_matches_one_device():
    """JAX: `keras.distribution.DataParallel` over 2 host devices gives the
    1-device steps, augmentation included. TensorFlow: `MirroredStrategy` over 2
    logical CPUs gives the same loss and weights as one device, and keeps the
    EMA target, memory bank and seeds in sync across replicas. (Keras has no
    PyTorch distribution: the torch run checks the JAX path.)"""
    backend = "tensorflow" if keras.backend.backend() == "tensorflow" else "jax"
    out = _run_worker(backend)
    _assert_same_step(out["one"], out["two"])
    if backend == "jax":
        assert out["sharded"] == {"batch": 2}
        assert out["one"]["memory_filled"] == 16
        return
    replicas = out["replicas"]
    assert np.isfinite(replicas["loss"]).all() and max(replicas["loss"]) <= 8.0
    assert replicas["banks_equal"] and replicas["bank_holds_global_batch"]
    assert replicas["targets_equal"] and replicas["seeds_equal"]
    assert replicas["filled"] == [16, 16]


def test_distribution_helpers_outside_a_replica_context():
    loss = keras.ops.convert_to_tensor(3.0)
    assert float(to_numpy(distribute.scale_loss_for_replicas(loss))) == 3.0
    x = random_log_mel(batch=2)
    np.testing.assert_array_equal(to_numpy(distribute.gather_from_replicas(x)), x)
    assert distribute.num_replicas() == 1
    with pytest.raises(ValueError, match="count"):
        distribute.host_devices(0)
    if keras.backend.backend() == "torch":
        with pytest.raises(ValueError, match="jax and tensorflow"):
            distribute.host_devices(2)


# --- the memory bank is written in place ------------------------------------------
BANK_ROWS = 512


def _jax_bank_bytes():
    """Compiles the augmentation module as a training step does (JAX, state
    donated) and returns XLA's own buffer accounting: the bytes the program
    needs beyond its donated inputs (temporaries plus outputs that do not
    reuse an input buffer), for the step and for a control step that also
    returns the old bank (which forces one bank-sized copy). This counts
    memory, not op names, so a renamed or fused copy shows up too."""
    import jax

    module = AugmentationModule(mean=-5.0, std=3.0, memory_size=BANK_ROWS, seed=0)
    module.build((None, *SHAPE))
    state = [v.value for v in module.non_trainable_variables]
    bank = [v.name for v in module.non_trainable_variables].index("memory")

    def step(state, x):
        (v1, v2), state = module.stateless_call([], state, x, training=True)
        return v1, v2, state

    def step_keeping_old_bank(state, x):
        return (*step(state, x), state[bank] * 1.0)

    x = random_log_mel(batch=8, n_mels=SHAPE[0], frames=SHAPE[1])
    extra = {}
    for fn in (step, step_keeping_old_bank):
        stats = jax.jit(fn, donate_argnums=(0,)).lower(state, x).compile().memory_analysis()
        extra[fn.__name__] = int(stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes)
    return {"bank": int(np.prod(state[bank].shape)) * 4, **extra}


def test_memory_bank_is_written_in_place():
    """No copy of the bank per step: XLA (checked on JAX's compiled program, in a
    subprocess on the other backends) and PyTorch (the same storage, written)."""
    if keras.backend.backend() == "jax":
        sizes = _jax_bank_bytes()
    else:
        sizes = _run_worker("bank-copies")["sizes"]
    # The control step holds a second bank; the real step holds less than one.
    assert sizes["step_keeping_old_bank"] >= sizes["bank"], sizes
    assert sizes["step"] < sizes["bank"], sizes
    if keras.backend.backend() == "torch":
        layer = LogMixupExp(memory_size=16, seed=0)
        layer(random_log_mel(batch=8), training=True)
        pointer = layer.memory.value.data_ptr()
        x = random_log_mel(batch=12, seed=1)  # wraps around the end
        layer(x, training=True)
        assert layer.memory.value.data_ptr() == pointer
        memory = to_numpy(layer.memory)
        np.testing.assert_array_equal(memory[8:], x[:8])
        np.testing.assert_array_equal(memory[:4], x[8:])


def _tf_programs_at_bank_positions():
    """The HLO that TensorFlow's XLA compiles for the augmentation module, at
    three successive memory-bank positions: how many different programs."""
    import tensorflow as tf

    module = AugmentationModule(mean=-5.0, std=3.0, memory_size=16, seed=0)
    x = tf.constant(random_log_mel(batch=4, n_mels=SHAPE[0], frames=SHAPE[1]))
    module(x, training=True)  # fill the bank, so that mixup runs
    step = tf.function(lambda x: module(x, training=True), jit_compile=True)
    programs, positions = set(), set()
    for _ in range(3):
        positions.add(int(module.mixup.memory_pointer.numpy()))
        programs.add(step.experimental_get_compiler_ir(x)(stage="hlo"))
        step(x)
    assert len(positions) == 3
    return len(programs)


def test_tensorflow_compiles_the_augmentation_once_for_every_bank_position():
    """Nothing in the XLA program may be a compile-time constant read from the
    layer state: a `tf.slice` starting at the bank pointer was (TensorFlow's XLA
    compiled a new program for each position, about 1 s per call)."""
    if keras.backend.backend() == "tensorflow":
        count = _tf_programs_at_bank_positions()
    else:
        count = _run_worker("tf-programs")["programs"]
    assert count == 1


# --- mixed precision: the augmentation maths stays float32 --------------------------
def _mixed_policy():
    return "mixed_float16" if keras.backend.backend() == "torch" else "mixed_bfloat16"


def test_mixed_precision_augmentation_and_frontend_run_in_float32():
    x = random_log_mel(batch=4)
    wave = np.random.default_rng(0).normal(0, 0.1, (2, 4000)).astype("float32")
    outputs = {}
    for policy in ("float32", _mixed_policy()):
        keras.config.set_dtype_policy(policy)
        keras.utils.set_random_seed(1)
        module = AugmentationModule(version="v2", mean=-5.0, std=3.0, memory_size=16, seed=3)
        module.build(x.shape)
        module(x, training=True)  # fill the bank
        views = module(x, training=True)
        log_mel = LogMelSpectrogram(n_mels=16)(wave)
        outputs[policy] = [to_numpy(v) for v in (*views, log_mel)]
        assert module.compute_dtype == "float32" and module.mixup.compute_dtype == "float32"
        assert all(keras.backend.standardize_dtype(v.dtype) == "float32" for v in views)
    keras.config.set_dtype_policy("float32")
    for a, b in zip(outputs["float32"], outputs[_mixed_policy()]):
        np.testing.assert_array_equal(a, b)  # bit for bit: no half-precision step


def test_mixed_precision_layers_cast_to_float32_inside():
    """Standalone under a mixed policy, each layer rounds its input and output
    to half precision but computes in float32 in between, with float32
    statistics and memory bank."""
    policy = _mixed_policy()
    half = "float16" if policy == "mixed_float16" else "bfloat16"
    x = random_log_mel(batch=4)
    x_half = to_numpy(keras.ops.cast(keras.ops.cast(x, half), "float32"))

    def twice(layer, inputs):  # the second call mixes with the first batch
        layer(inputs, training=True)
        return layer(inputs[::-1], training=True)

    cases = [
        (lambda: PreNorm(mean=-5.4919195, std=5.0389895), lambda layer, v: layer(v, training=True)),
        (lambda: PostNorm(), lambda layer, v: layer(v, training=True)),
        (lambda: LogMixupExp(alpha=0.4, memory_size=8, seed=2), twice),
    ]
    for make, run in cases:
        reference = to_numpy(run(make(), x_half))
        keras.config.set_dtype_policy(policy)
        try:
            out = run(make(), x)
        finally:
            keras.config.set_dtype_policy("float32")
        assert keras.backend.standardize_dtype(out.dtype) == half
        expected = to_numpy(keras.ops.cast(keras.ops.cast(reference, half), "float32"))
        np.testing.assert_array_equal(to_numpy(keras.ops.cast(out, "float32")), expected)


# --- the backend-tuned conv-block layers ------------------------------------------------
def _gradients(layer, x, w, training):
    """d sum(layer(x) * w) / d(x, trainable weights...) with the backend's own
    autodiff (layer state is left as it was on JAX; TensorFlow and PyTorch
    update moving statistics as a training call does, alike for both layers)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        # stateless_call passes `training` on to `call`, which not every layer takes.
        kwargs = {"training": training} if "training" in inspect.signature(layer.call).parameters else {}

        def loss(inputs, weights):
            y, _ = layer.stateless_call(weights, non_trainable, inputs, **kwargs)
            return (y * w).sum()

        dx, dweights = jax.grad(loss, argnums=(0, 1))(x, trainable)
        return [np.asarray(g) for g in [dx, *dweights]]
    if backend == "tensorflow":
        import tensorflow as tf

        inputs = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.reduce_sum(layer(inputs, training=training) * w)
        return [g.numpy() for g in tape.gradient(loss, [inputs, *layer.trainable_variables])]
    import torch

    inputs = torch.tensor(x, requires_grad=True)
    weights = [v.value for v in layer.trainable_variables]
    for weight in weights:
        weight.grad = None
    (layer(inputs, training=training) * torch.tensor(w)).sum().backward()
    return [g.grad.detach().cpu().numpy() for g in [inputs, *weights]]


def test_conv_block_layers_match_plain_keras_layers():
    """Same weights in the tuned and the plain Keras layers give the same
    outputs, gradients (input and weights) and moving statistics (training and
    inference)."""
    weight = np.random.default_rng(1).normal(size=(3, 10, 13, 5)).astype("float32")
    conv, batch_norm, pool = _fast_layers.conv_block_layers()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 10, 13, 4)).astype("float32")
    pairs = [
        (conv(5, 3, padding="same"), keras.layers.Conv2D(5, 3, padding="same")),
        (batch_norm(epsilon=1e-5, momentum=0.9), keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)),
        (pool(2), keras.layers.MaxPooling2D(2)),
    ]
    for fast, plain in pairs:
        assert isinstance(fast, type(plain)) and type(fast).__name__ == type(plain).__name__
        fast.build(x.shape)
        plain.build(x.shape)
        for a, b in zip(fast.weights, plain.weights):
            value = rng.uniform(0.5, 1.5, a.shape).astype("float32")
            a.assign(value)
            b.assign(value)
        for training in (True, False):
            y_fast = to_numpy(fast(x, training=training))
            y_plain = to_numpy(plain(x, training=training))
            np.testing.assert_allclose(y_fast, y_plain, rtol=1e-5, atol=1e-5)
            w = weight[..., : y_fast.shape[-1]][:, : y_fast.shape[1], : y_fast.shape[2]]
            grads_fast = _gradients(fast, x, w, training)
            grads_plain = _gradients(plain, x, w, training)
            assert len(grads_fast) == len(grads_plain) == 1 + len(plain.trainable_weights)
            for g_fast, g_plain in zip(grads_fast, grads_plain):
                assert np.abs(g_plain).max() > 0
                scale = max(1.0, float(np.abs(g_plain).max()))
                np.testing.assert_allclose(g_fast, g_plain, rtol=1e-4, atol=1e-5 * scale)
        for a, b in zip(fast.weights, plain.weights):
            np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-5, atol=1e-6)
    assert (pool(2)(x[:, :9, :11]).shape) == (3, 4, 5, 4)  # odd sizes floor


def test_tuned_batch_normalization_matches_keras_on_2d_inputs():
    """The projector's and predictor's BatchNormalization (`[B, C]` inputs)."""
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(6, 5)).astype("float32")
    w = rng.normal(size=(6, 5)).astype("float32")
    fast = _fast_layers.batch_normalization()(epsilon=1e-5, momentum=0.9)
    plain = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)
    assert type(fast).__name__ == "BatchNormalization"
    for layer in (fast, plain):
        layer.build(x.shape)
        for variable in layer.weights:
            variable.assign(np.linspace(0.5, 1.5, 5).astype("float32"))
    for training in (True, False):
        np.testing.assert_allclose(
            to_numpy(fast(x, training=training)), to_numpy(plain(x, training=training)), rtol=1e-5, atol=1e-5
        )
        for g_fast, g_plain in zip(_gradients(fast, x, w, training), _gradients(plain, x, w, training)):
            np.testing.assert_allclose(g_fast, g_plain, rtol=1e-4, atol=1e-5)
    for a, b in zip(fast.weights, plain.weights):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-5, atol=1e-6)


def test_conv_block_layers_keep_a_nan_input_visible():
    """A NaN in the input makes the compiled training step's loss non-finite
    (the NaN guard of `byola-keras pretrain` relies on it)."""
    conv, batch_norm, pool = _fast_layers.conv_block_layers()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8, 10, 1)), conv(4, 3, padding="same"), batch_norm(), keras.layers.ReLU(), pool(2)]
    )
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(4, 8, 10, 1)).astype("float32")
    y = np.zeros((4, 4, 5, 4), "float32")
    assert np.isfinite(model.train_on_batch(x, y))
    x[1, 3, 4, 0] = np.nan
    assert not np.isfinite(model.train_on_batch(x, y))


def _tf_onednn_nan_losses():
    """TensorFlow with its oneDNN kernels (its default on AVX-512 CPUs, set by
    `byola_keras` on others): the learner's losses on a clean batch and on one
    holding an all-NaN clip."""
    from tensorflow.python.util import _pywrap_util_port

    from byola_keras.models import BYOLA

    keras.utils.set_random_seed(0)
    model = BYOLA(AudioNTT2020(d=64), mean=-5.0, std=3.0, memory_size=16, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    x = random_log_mel(batch=4, n_mels=64, frames=96)
    loss = lambda batch: float(np.ravel(model.train_on_batch(batch))[0])  # noqa: E731
    clean = loss(x)
    x[0] = np.nan
    poisoned = loss(x)
    return {"onednn": bool(_pywrap_util_port.IsMklEnabled()), "clean": clean, "poisoned": poisoned}


def test_nan_input_gives_a_non_finite_loss_with_tensorflow_onednn_kernels():
    """oneDNN fuses batch norm with the ReLU after it, and that ReLU maps NaN
    to 0: the tuned TensorFlow BatchNormalization keeps them apart, so a NaN
    clip still gives a non-finite loss (the NaN guard of `byola-keras
    pretrain` relies on it). Runs TensorFlow in a subprocess on every backend."""
    out = _run_worker("tf-onednn-nan", TF_ENABLE_ONEDNN_OPTS="1")
    assert out["onednn"]
    assert np.isfinite(out["clean"])
    assert not np.isfinite(out["poisoned"])


def test_tuned_dropout_matches_keras_dropout():
    """The encoders' dropout layer (JAX: `jax_dropout`'s mask) gives Keras's
    `Dropout` outputs for the same seed, call after call, saves under the
    class name `Dropout` and is the identity outside training."""
    from byola_keras.backend.dropout import JaxDropout, dropout_layer

    assert dropout_layer() is (JaxDropout if keras.backend.backend() == "jax" else keras.layers.Dropout)
    x = np.random.default_rng(0).normal(size=(4, 24, 48)).astype("float32")
    tuned, plain = JaxDropout(0.3, seed=11), keras.layers.Dropout(0.3, seed=11)
    assert isinstance(tuned, keras.layers.Dropout) and type(tuned).__name__ == "Dropout"
    outputs = []
    for _ in range(3):
        y_tuned, y_plain = to_numpy(tuned(x, training=True)), to_numpy(plain(x, training=True))
        np.testing.assert_allclose(y_tuned, y_plain, rtol=1e-6)
        outputs.append(y_tuned)
    assert not np.array_equal(outputs[0], outputs[1])  # the seed generator advances
    dropped = np.mean(outputs[0] == 0)
    assert 0.25 < dropped < 0.35
    np.testing.assert_array_equal(to_numpy(tuned(x, training=False)), x)
    model = keras.Sequential([keras.Input((24, 48)), JaxDropout(0.3, seed=2)])
    restored = save_and_load(model)
    assert type(restored.layers[0]) is JaxDropout and restored.layers[0].rate == 0.3


def test_encoder_saved_on_this_backend_keeps_keras_layer_names():
    encoder = AudioNTT2020(d=32, n_mels=16)
    names = [type(layer).__name__ for layer in encoder.layers[1:5]]
    assert names == ["Conv2D", "BatchNormalization", "ReLU", "MaxPooling2D"]
    assert type(encoder.get_layer("fc_dropout")).__name__ == "Dropout"
    x = random_log_mel(batch=2, n_mels=16, frames=40)
    restored = save_and_load(encoder)
    np.testing.assert_allclose(to_numpy(restored(x)), to_numpy(encoder(x)), atol=1e-6)


if __name__ == "__main__":
    if sys.argv[1] == "bank-copies":
        print("RESULT " + json.dumps({"sizes": _jax_bank_bytes()}))
    elif sys.argv[1] == "tf-programs":
        print("RESULT " + json.dumps({"programs": _tf_programs_at_bank_positions()}))
    elif sys.argv[1] == "tf-onednn-nan":
        print("RESULT " + json.dumps(_tf_onednn_nan_losses()))
    else:
        _worker(sys.argv[1])
