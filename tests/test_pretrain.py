"""`byola-keras pretrain` end to end: real audio files, data-parallel training and the
non-finite-loss guard (exact resume after SIGKILL: tests/test_resume.py)."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from byola_keras import pretrain as pretrain_lib
from byola_keras.data import make_default_corpus
from tests.testing import random_log_mel, to_numpy


def _cli(out, audio_dir, epochs, extra=()):
    return [
        sys.executable, "-m", "byola_keras.cli", "pretrain", str(audio_dir),
        "--out", str(out), "--epochs", str(epochs), "--batch-size", "4",
        "--steps-per-epoch", "2", "--dim", "64", "--backend", keras.backend.backend(),
        "--workers", "1", *extra,
    ]


def _env():
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    return make_default_corpus(str(tmp_path_factory.mktemp("corpus")), num_clips=8, seed=1)


def test_pretrain_cli_reports_bad_input(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        _cli(tmp_path / "run", empty, epochs=1), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert str(empty) in result.stdout


@pytest.mark.large
def test_pretrain_cli_data_parallel_on_two_host_devices(tmp_path, audio_dir):
    """`--data-parallel --host-devices 2`: JAX (DataParallel) and TensorFlow
    (MirroredStrategy) train over two CPU devices, push each global batch into
    the memory bank once, write a checkpoint and an encoder; a batch that does
    not split over the devices is refused by name; PyTorch says why not."""
    env = _env()
    env.pop("XLA_FLAGS", None)
    out = tmp_path / "run"
    if keras.backend.backend() == "torch":
        result = subprocess.run(
            _cli(out, audio_dir, epochs=1, extra=("--data-parallel",)),
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Data-parallel training needs the jax or tensorflow backend" in result.stdout
        return
    extra = ("--data-parallel", "--host-devices", "2")
    result = subprocess.run(
        _cli(out, audio_dir, epochs=1, extra=extra), env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Data-parallel training over 2 device(s), 2 samples each." in result.stdout
    meta, arrays = pretrain_lib.CheckpointWriter.read(out / "checkpoint-000000002.npz")
    assert (meta["epoch"], meta["step"]) == (1, 0) and np.isfinite(meta["logs"]["loss"])
    state = dict(zip((path for path, _, _ in meta["variables"]), arrays))
    assert int(state[next(p for p in state if p.endswith("iteration"))]) == 2
    assert int(state[next(p for p in state if p.endswith("memory_filled"))]) == 8  # 2 steps x batch 4
    encoder = keras.saving.load_model(str(out / "encoder.keras"), safe_mode=True)
    assert tuple(encoder(np.zeros((1, 16000), "float32")).shape) == (1, 64)  # a WaveformEncoder

    odd = subprocess.run(
        [*_cli(tmp_path / "odd", audio_dir, epochs=1, extra=extra), "--batch-size", "3"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert odd.returncode == 2, odd.stdout + odd.stderr
    assert "batch_size 3 is not a multiple of the 2 devices" in odd.stdout


def test_settings_merge_config_and_overrides():
    settings = pretrain_lib.resolve_settings({"alpha": 0.1, "epochs": 3}, epochs=5, version="v2")
    assert settings["alpha"] == 0.1 and settings["epochs"] == 5
    assert settings["dim"] == 3072 and settings["lr"] == 1e-4
    with pytest.raises(ValueError, match="Unknown"):
        pretrain_lib.resolve_settings({"alpah": 0.1})


class _PoisonableData(keras.utils.PyDataset):
    """Two clean batches per epoch; batch 1's first clip is all NaN once `poisoned`
    is set (a whole clip, so that no random crop can leave the NaN out)."""

    def __init__(self):
        super().__init__()
        self.poisoned = False

    def __len__(self):
        return 2

    def __getitem__(self, index):
        x = random_log_mel(batch=4, n_mels=64, frames=96, seed=index)
        if self.poisoned and index == 1:
            x[0] = np.nan
        return x


class _PoisonAtEpoch(keras.callbacks.Callback):
    def __init__(self, data, epoch):
        super().__init__()
        self.data, self.epoch = data, epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.data.poisoned = epoch >= self.epoch


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    settings = pretrain_lib.resolve_settings(dim=64, batch_size=4, memory_size=16)
    model = pretrain_lib.build_learner(settings, mean=-5.0, std=3.0)
    guard = pretrain_lib.NonFiniteLossGuard()
    writer = pretrain_lib.CheckpointWriter(str(tmp_path))
    checkpoint = pretrain_lib.TrainingCheckpoint(writer, guard, steps_per_epoch=2, meta={}, every=1)
    data = _PoisonableData()
    model.fit(
        data, epochs=4, callbacks=[_PoisonAtEpoch(data, 1), guard, checkpoint], verbose=0, shuffle=False
    )
    assert guard.failed_at == (1, 1)
    # Steps 1 and 2 (epoch 1) and 3 (epoch 2, step 1) were good; step 4 was not.
    assert [os.path.basename(p) for p in writer.paths()] == [
        "checkpoint-000000003.npz", "checkpoint-000000002.npz"
    ]
    meta, arrays = writer.read(writer.paths()[0])
    assert (meta["epoch"], meta["step"]) == (1, 1)
    twin = pretrain_lib.build_learner(settings, mean=-5.0, std=3.0)
    pretrain_lib.restore_training_state(twin, meta, arrays)
    assert all(np.isfinite(to_numpy(v)).all() for v in twin.trainable_variables)


def test_byola_fit_without_statistics_says_what_to_do():
    from byola_keras.models import BYOLA, AudioNTT2020

    model = BYOLA(
        AudioNTT2020(d=32, n_mels=16), projection_hidden=32, projection_dim=8, memory_size=8,
        input_shape=(16, 24, 1),
    )
    model.compile(optimizer="adam")
    x = random_log_mel(batch=4, n_mels=16, frames=24)
    with pytest.raises(ValueError, match=r"no pre-normalization statistics.*model\.adapt"):
        model.fit(x, batch_size=4, epochs=1, verbose=0)
    model.adapt(x)
    assert np.isfinite(model.fit(x, batch_size=4, epochs=1, verbose=0).history["loss"]).all()
