"""Exact resume of `byola-keras pretrain` after SIGKILL at deterministic points
and after the signals of preemption (SIGTERM, SIGINT, SIGUSR1), the
checkpoint's fallback to the previous one, the resume rules and the lock on
the output folder."""

import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from byola_keras import _files, preemption
from byola_keras import pretrain as pretrain_lib
from byola_keras.data import make_default_corpus
from tests.testing import pretrain_command

EPOCHS, STEPS = 2, 3


def _cli(out, audio_dir, extra=()):
    return pretrain_command(out, audio_dir, EPOCHS, STEPS, extra)


def _run(out, audio_dir, kill_at=None, extra=(), signal_at=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop(pretrain_lib.KILL_ENV, None)
    env.pop(preemption.TEST_ENV, None)
    if kill_at:
        env[pretrain_lib.KILL_ENV] = kill_at
    if signal_at:
        env[preemption.TEST_ENV] = signal_at
    return subprocess.run(_cli(out, audio_dir, extra), env=env, capture_output=True, text=True, timeout=900)


def _checkpoints(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-") and n.endswith(".npz"))


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    return make_default_corpus(str(tmp_path_factory.mktemp("corpus")), num_clips=8, seed=1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, audio_dir):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = _run(out, audio_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.mark.large
def test_run_killed_at_several_points_and_resumed_ends_identical(tmp_path, audio_dir, reference):
    """Killed mid-epoch, mid-write, after a complete write before its rename,
    after the rename before the old one's removal, and resumed from a damaged
    latest checkpoint: every variable (weights, EMA target, BatchNorm
    statistics, memory bank, every SeedGenerator state, optimizer) ends equal
    to the uninterrupted run's."""
    out = tmp_path / "run"
    # 6 steps; checkpoints at global steps 2 (mid-epoch), 3 (epoch end), 4, 6.
    killed = _run(out, audio_dir, "step:3")  # after step 3, before its epoch-end checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert _checkpoints(out) == ["checkpoint-000000002.npz"]

    # Resumes at epoch 1 step 2 (mid-epoch); killed half-way through writing step 3.
    killed = _run(out, audio_dir, "write:partial:1")
    assert killed.returncode == -signal.SIGKILL
    assert "Resuming from" in killed.stdout and "at epoch 1, step 2." in killed.stdout
    assert _checkpoints(out) == ["checkpoint-000000002.npz"]
    assert any(".tmp-" in name for name in os.listdir(out))

    # Again from step 2; step 3 written, step 4 complete on disk but not renamed.
    killed = _run(out, audio_dir, "write:written:2")
    assert killed.returncode == -signal.SIGKILL
    assert _checkpoints(out) == ["checkpoint-000000002.npz", "checkpoint-000000003.npz"]

    # From step 3 (epoch 2, step 0); step 4 renamed into place, step 2 not yet removed.
    killed = _run(out, audio_dir, "write:renamed:1")
    assert killed.returncode == -signal.SIGKILL
    assert "at epoch 2, step 0." in killed.stdout
    assert _checkpoints(out)[-1] == "checkpoint-000000004.npz"

    # The newest checkpoint is damaged: the run says so and resumes from step 3.
    latest = out / "checkpoint-000000004.npz"
    blob = bytearray(latest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    latest.write_bytes(bytes(blob))
    result = _run(out, audio_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Checkpoint {latest} cannot be read" in result.stdout
    assert "at epoch 2, step 0." in result.stdout
    assert not any(".tmp-" in name for name in os.listdir(out))
    assert _checkpoints(out) == ["checkpoint-000000004.npz", "checkpoint-000000006.npz"]

    meta_ref, ref = pretrain_lib.CheckpointWriter.read(reference / "checkpoint-000000006.npz")
    meta, got = pretrain_lib.CheckpointWriter.read(out / "checkpoint-000000006.npz")
    assert (meta["epoch"], meta["step"]) == (meta_ref["epoch"], meta_ref["step"]) == (EPOCHS, 0)
    names = [path for path, _, _ in meta_ref["variables"]]
    assert any("seed_generator_state" in n for n in names)
    assert any("memory" in n for n in names) and any("target_" in n for n in names)
    for name, a, b in zip(names, ref, got):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert (out / "encoder.keras").exists()


@pytest.mark.large
def test_signals_stop_after_the_step_in_flight_and_the_resumed_run_ends_identical(tmp_path, audio_dir, reference):
    """SIGTERM while decoding, SIGINT after step 1, SIGUSR1 while step 5 runs:
    each run ends with exit code 75 and one line; nothing decoded is lost, the
    checkpoint is at the signal's step (no epoch-end checkpoint or history row
    for the stopped epoch), and the last run ends with every variable equal to
    the uninterrupted run's."""
    out = tmp_path / "run"
    stopped = _run(out, audio_dir, signal_at="decode:3:TERM")
    assert stopped.returncode == preemption.EXIT_CODE, stopped.stdout + stopped.stderr
    assert "Decoding stopped: 3 clip(s) decoded and kept" in stopped.stdout
    assert "Stopped by SIGTERM before training: no checkpoint yet; run the same command again" in stopped.stdout
    assert _checkpoints(out) == [] and "Traceback" not in stopped.stderr

    stopped = _run(out, audio_dir, signal_at="step:1:INT")
    assert stopped.returncode == preemption.EXIT_CODE, stopped.stdout + stopped.stderr
    assert "kept 3 clips, decoded 5 new" in stopped.stdout
    assert "SIGINT received: stopping after the step in flight" in stopped.stderr
    assert f"Stopped by SIGINT after step 1 of epoch 1: checkpoint {out / 'checkpoint-000000001.npz'} written" in (
        stopped.stdout
    )
    assert _checkpoints(out) == ["checkpoint-000000001.npz"]
    assert (out / "history.csv").read_text().strip() == ""

    stopped = _run(out, audio_dir, signal_at="begin:5:USR1")  # resumes mid-epoch at step 1
    assert stopped.returncode == preemption.EXIT_CODE, stopped.stdout + stopped.stderr
    assert "at epoch 1, step 1." in stopped.stdout and "after step 2 of epoch 2" in stopped.stdout
    assert _checkpoints(out) == ["checkpoint-000000004.npz", "checkpoint-000000005.npz"]

    finished = _run(out, audio_dir)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    meta_ref, ref = pretrain_lib.CheckpointWriter.read(reference / "checkpoint-000000006.npz")
    meta, got = pretrain_lib.CheckpointWriter.read(out / "checkpoint-000000006.npz")
    for (name, _, _), a, b in zip(meta_ref["variables"], ref, got):
        np.testing.assert_array_equal(a, b, err_msg=name)
    rows = (out / "history.csv").read_text().strip().splitlines()
    assert [row.split(",")[0] for row in rows] == ["epoch", "0", "1"]


def test_second_sigint_stops_at_once():
    previous = signal.getsignal(signal.SIGTERM)
    with preemption.StopSignals() as signals:
        assert not signals.requested
        signal.raise_signal(signal.SIGUSR1)
        assert signals.received == "SIGUSR1"
        signal.raise_signal(signal.SIGTERM)  # later signals other than SIGINT change nothing
        assert signals.received == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.large
def test_resume_with_other_settings_names_them(reference, audio_dir, tmp_path):
    result = _run(reference, audio_dir, extra=("--dim", "32", "--alpha", "0.1", "--lr", "0.001"))
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stdout
    for flag in ("--dim: the run has 64, given 32", "--alpha", "--lr"):
        assert flag in message
    assert "--restart" in message and "Traceback" not in result.stderr
    assert len(message.strip().splitlines()) == 1


def test_checkpoint_keeps_every_seed_generator_state(tmp_path):
    """The state list holds every SeedGenerator (augmentation layers, Dropout)
    and the optimizer; a restored learner draws the same numbers next."""
    settings = pretrain_lib.resolve_settings(dim=1024 + 32, batch_size=4, memory_size=8, version="v2")
    model = pretrain_lib.build_learner(settings, mean=-5.0, std=3.0, projection_hidden=32, projection_dim=8)
    variables = pretrain_lib.training_state_variables(model)
    seeds = [v for v in variables if v.name == "seed_generator_state"]
    owners = {
        type(layer).__name__: id(generator.state)
        for layer in model._flatten_layers()
        for generator in layer._seed_generators
    }
    assert set(owners) == {"LogMixupExp", "RandomResizeCrop", "RandomLinearFader", "Dropout"}
    assert set(owners.values()) == {id(v) for v in seeds}
    x = np.random.default_rng(0).normal(-5, 3, (4, 64, 96, 1)).astype("float32")
    model.fit(x, batch_size=4, epochs=1, verbose=0, shuffle=False)
    writer = pretrain_lib.CheckpointWriter(str(tmp_path))
    path = writer.write(model, {"global_step": 1})
    meta, arrays = writer.read(path)
    twin = pretrain_lib.build_learner(settings, mean=-5.0, std=3.0, projection_hidden=32, projection_dim=8)
    pretrain_lib.restore_training_state(twin, meta, arrays)
    for a, b in zip(variables, pretrain_lib.training_state_variables(twin)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_lock_names_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    code = (
        "import sys, os; from byola_keras import _files\n"
        "lock = _files.FolderLock(sys.argv[1]).acquire(); print(os.getpid(), flush=True)\n"
        "sys.stdin.readline()\n"
        "if sys.argv[2] == 'die': os.kill(os.getpid(), 9)\n"
    )
    for mode in ("wait", "die"):
        holder = subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path), mode], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )
        pid = holder.stdout.readline().strip()
        with pytest.raises(_files.FolderInUse, match=f"in use by process {pid} "):
            _files.FolderLock(tmp_path, "output folder").acquire()
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    with _files.FolderLock(tmp_path) as lock:  # the dead holder's lock is taken over
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        assert lock.path.endswith(".lock")


def test_checkpoint_stores_the_filled_rows_of_the_bank_and_restores_it_exactly(tmp_path):
    """While the mixup bank fills, a checkpoint holds only its filled rows; the
    restored learner has the same bank (zeros after them) and trains on
    bit-identically. Once full, the whole bank is stored."""
    settings = pretrain_lib.resolve_settings(dim=64, batch_size=4, memory_size=12)
    build = lambda: pretrain_lib.build_learner(  # noqa: E731
        settings, mean=-5.0, std=3.0, projection_hidden=32, projection_dim=8)
    x = np.random.default_rng(0).normal(-5, 3, (8, 64, 96, 1)).astype("float32")
    model = build()
    model.fit(x, batch_size=4, epochs=1, verbose=0, shuffle=False)  # 8 of 12 rows
    writer = pretrain_lib.CheckpointWriter(str(tmp_path))
    # As the checkpoint callback does: the backend's global random state too
    # (PyTorch's Dropout and data loader draw from it).
    rng = pretrain_lib.global_rng_state()
    meta, arrays = writer.read(writer.write(model, {"global_step": 2}))
    index = [i for i, (path, _, _) in enumerate(meta["variables"]) if path.endswith("mixup/memory")]
    assert len(index) == 1 and meta["variables"][index[0]][1][0] == 12
    assert arrays[index[0]].shape[0] == 8
    twin = build()
    pretrain_lib.restore_training_state(twin, meta, arrays)
    for a, b in zip(pretrain_lib.training_state_variables(model), pretrain_lib.training_state_variables(twin)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    # Steps by `train_on_batch` (16 rows pushed: the bank wraps around). On
    # PyTorch a first `fit()` of the restored twin and a second `fit()` of the
    # original differ (not yet explained; the command line's resume, a new
    # process each time, is bit-identical on every backend: the tests above).
    for learner in (model, twin):
        pretrain_lib.set_global_rng_state(rng)
        for batch in (x[:4], x[4:]):
            learner.train_on_batch(batch)
    for a, b in zip(pretrain_lib.training_state_variables(model), pretrain_lib.training_state_variables(twin)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    meta, arrays = writer.read(writer.write(twin, {"global_step": 4}))
    assert arrays[index[0]].shape[0] == 12
