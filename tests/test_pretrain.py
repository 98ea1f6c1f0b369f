"""`byola-keras pretrain` end to end: real audio files, checkpoints, SIGKILL and resume,
and the non-finite-loss guard."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

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


@pytest.mark.large
def test_pretrain_killed_mid_checkpoint_resumes_exactly(tmp_path, audio_dir):
    out = tmp_path / "run"
    state = out / "state.json"
    proc = subprocess.Popen(
        _cli(out, audio_dir, epochs=3), env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    killed_during_write = False
    try:
        deadline = time.time() + 420
        while not state.exists():  # wait for the first full checkpoint
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        while proc.poll() is None and time.time() < deadline:  # then kill during the next write
            if any(".tmp-" in name for name in os.listdir(out)):
                killed_during_write = True
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # What is on disk is a complete, loadable checkpoint that matches state.json.
    done = json.loads(state.read_text())["epochs_done"]
    assert done in (1, 2)
    model = keras.saving.load_model(str(out / "checkpoint.keras"), safe_mode=True)
    before = pretrain_lib.state_fingerprint(model)
    assert before["optimizer_iterations"] == 2 * done
    assert before["memory_filled"] == 8 * done
    del model

    result = subprocess.run(
        _cli(out, audio_dir, epochs=3), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Resuming from {out / 'checkpoint.keras'} after epoch {done}." in result.stdout
    resumed = json.loads(result.stdout.split("Resumed state: ")[1].splitlines()[0])
    assert resumed["optimizer_iterations"] == before["optimizer_iterations"]
    assert resumed["memory_filled"] == before["memory_filled"]
    assert resumed["target_sum"] == pytest.approx(before["target_sum"], rel=1e-12, abs=1e-9)
    assert resumed["memory_sum"] == pytest.approx(before["memory_sum"], rel=1e-12, abs=1e-9)
    assert not any(".tmp-" in name for name in os.listdir(out))

    final = json.loads(state.read_text())
    assert final["epochs_done"] == 3 and final["optimizer_iterations"] == 6
    with open(out / "history.csv") as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs[-(3 - done):] == list(range(done, 3))  # continues, no restart
    stats = json.loads((out / "norm_stats.json").read_text())
    assert np.isfinite(stats["mean"]) and stats["std"] > 0
    encoder = keras.saving.load_model(str(out / "encoder.keras"), safe_mode=True)
    assert tuple(encoder(np.zeros((1, 64, 101, 1), "float32")).shape) == (1, 64)
    if killed_during_write:
        assert done == 1, "a checkpoint killed mid-write must not replace the previous one"


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
    state = json.loads((out / "state.json").read_text())
    assert state["epochs_done"] == 1 and state["optimizer_iterations"] == 2
    assert np.isfinite(state["logs"]["loss"])
    model = keras.saving.load_model(str(out / "checkpoint.keras"), safe_mode=True)
    assert pretrain_lib.state_fingerprint(model)["memory_filled"] == 8  # 2 steps x global batch 4
    encoder = keras.saving.load_model(str(out / "encoder.keras"), safe_mode=True)
    assert tuple(encoder(np.zeros((1, 64, 101, 1), "float32")).shape) == (1, 64)

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
    checkpoint = pretrain_lib.EpochCheckpoint(str(tmp_path), guard, {})
    data = _PoisonableData()
    model.fit(
        data, epochs=4, callbacks=[_PoisonAtEpoch(data, 1), guard, checkpoint], verbose=0, shuffle=False
    )
    assert guard.failed_at == (1, 1)
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["epochs_done"] == 1
    restored = keras.saving.load_model(str(tmp_path / "checkpoint.keras"), safe_mode=True)
    assert all(np.isfinite(to_numpy(v)).all() for v in restored.trainable_variables)
