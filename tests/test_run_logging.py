"""TensorBoard logs and history.json of `byola-keras pretrain`: written without
TensorFlow, read back by TensorBoard's own loader, and one curve with each step
once after a SIGKILL and a resume, equal to the uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from byola_keras import pretrain as pretrain_lib
from byola_keras import run_logging
from byola_keras.data import make_default_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, STEPS = 2, 3
STEP_TAGS = ("step_loss", "step_embedding_spread", "step_learning_rate")
EPOCH_TAGS = ("epoch_loss", "epoch_embedding_spread", "epoch_learning_rate")
SPEED_TAGS = ("step_steps_per_second", "step_samples_per_second", "epoch_samples_per_second", "epoch_seconds")


def _load_with_tensorboard(logdir):
    """`{tag: [(step, value)]}` as TensorBoard's `EventAccumulator` loads `logdir`
    (with its purging of restarted runs), in a process without TensorFlow."""
    code = (
        "import json, sys, types\n"
        "sys.modules['tensorboard.compat.notf'] = types.ModuleType('notf')  # TensorBoard's no-TF switch\n"
        "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n"
        "ea = EventAccumulator(sys.argv[1], size_guidance={'scalars': 0, 'images': 0})\n"
        "ea.Reload()\n"
        "tags = ea.Tags()\n"
        "out = {t: [[e.step, e.value] for e in ea.Scalars(t)] for t in tags['scalars']}\n"
        "out.update({t: [[e.step, e.encoded_image_string.hex()] for e in ea.Images(t)] for t in tags['images']})\n"
        "print(json.dumps([out, 'tensorflow' in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(logdir)], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded, tensorflow = json.loads(done.stdout.strip().splitlines()[-1])
    assert not tensorflow
    return {tag: [tuple(item) for item in items] for tag, items in loaded.items()}


def test_event_files_truncate_and_restart_as_tensorboard_reads_them(tmp_path):
    """Steps past a resume point are cut from the files; a restarted segment's
    `SessionLog.START` makes TensorBoard drop what it loaded past it; a record
    cut short by a kill is ignored."""
    logdir = tmp_path / "tb"
    first = run_logging.EventFile(logdir)
    for step in range(1, 6):
        first.scalars(step, {"step_loss": 10.0 + step})
        first.flush()
    first.close()
    with open(first.path, "ab") as f:
        f.write(b"\x10\x00\x00")  # the start of a record, cut short
    assert [e.step for _, _, e in run_logging.read_records(first.path)] == [0, 1, 2, 3, 4, 5]

    # A live TensorBoard saw steps 1-5; the run resumed from step 3.
    second = run_logging.EventFile(logdir)
    second.session_start(4)
    for step in range(4, 7):
        second.scalars(step, {"step_loss": 20.0 + step})
    second.close()
    loaded = _load_with_tensorboard(logdir)
    assert loaded["step_loss"] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]

    # What `TrainingLog` does on resume: cut every file back to the checkpoint's step.
    assert run_logging.truncate_events(logdir, 3) == 6  # 4-5 of the first file; START, 4-6 of the second
    assert [p == first.path for p in run_logging.event_files(logdir)] == [True]  # the second held nothing <= 3
    assert run_logging.read_scalars(logdir) == {"step_loss": [(1, 11.0), (2, 12.0), (3, 13.0)]}
    assert os.path.getsize(first.path) == run_logging.read_records(first.path)[-1][1]
    assert run_logging.truncate_events(logdir, 3) == 0  # idempotent (a kill while cutting)


def test_augmentation_image_leaves_the_run_state_alone():
    """The image's views come from copies of the augmentation's state: its
    random generators and memory bank are not touched, and the same state gives
    the same image."""
    settings = pretrain_lib.resolve_settings(dim=16, batch_size=4, memory_size=8)
    model = pretrain_lib.build_learner(settings, mean=-5.0, std=3.0, projection_hidden=16, projection_dim=8)
    x = np.random.default_rng(0).normal(-5, 3, (4, 64, 96, 1)).astype("float32")
    model.augmentation(x, training=True)  # fill the bank a little
    state = [keras.ops.convert_to_numpy(v).copy() for v in model.augmentation.non_trainable_variables]
    image, height, width = run_logging.augmentation_image(model, x[:1])
    again, _, _ = run_logging.augmentation_image(model, x[:1])
    for before, variable in zip(state, model.augmentation.non_trainable_variables):
        np.testing.assert_array_equal(before, keras.ops.convert_to_numpy(variable), err_msg=variable.path)
    np.testing.assert_array_equal(image, again)
    assert image.dtype == np.uint8 and image.shape == (height, width) == (128, 3 * 192 + 2 * 4)
    assert not np.array_equal(image[:, :192], image[:, 196:388])  # a view differs from its segment
    assert run_logging.png(image)[:8] == b"\x89PNG\r\n\x1a\n"


def _cli(out, audio_dir):
    return [
        sys.executable, "-m", "byola_keras.cli", "pretrain", str(audio_dir), "--out", str(out),
        "--epochs", str(EPOCHS), "--batch-size", "4", "--steps-per-epoch", str(STEPS), "--dim", "32",
        "--memory-size", "16", "--checkpoint-every", "2", "--backend", keras.backend.backend(),
        "--workers", "1", "--verbose", "0", "--tensorboard-every", "1", "--tensorboard-images", "1",
    ]


def _run(out, audio_dir, kill_at=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop(pretrain_lib.KILL_ENV, None)
    if kill_at:
        env[pretrain_lib.KILL_ENV] = kill_at
    return subprocess.run(_cli(out, audio_dir), env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.large
def test_killed_and_resumed_run_logs_one_curve_equal_to_the_uninterrupted_one(tmp_path):
    audio_dir = make_default_corpus(str(tmp_path / "corpus"), num_clips=8, seed=1)
    reference = tmp_path / "reference"
    result = _run(reference, audio_dir)
    assert result.returncode == 0, result.stdout + result.stderr

    # Checkpoints at steps 2, 3 (epoch end) and 4; killed after step 5 was logged.
    out = tmp_path / "run"
    killed = _run(out, audio_dir, "step:5")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    logdir = out / run_logging.EVENTS_DIR
    assert [s for s, _ in run_logging.read_scalars(logdir)["step_loss"]] == [1, 2, 3, 4, 5]
    resumed = _run(out, audio_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "at epoch 2, step 1." in resumed.stdout  # from step 4, in the middle of epoch 2

    ref = run_logging.read_scalars(reference / run_logging.EVENTS_DIR)
    got = run_logging.read_scalars(logdir)
    assert len(run_logging.event_files(logdir)) == 2  # the killed segment's file, cut at step 4, and the resumed one
    for tag in STEP_TAGS + SPEED_TAGS[:2]:
        assert [s for s, _ in got[tag]] == [1, 2, 3, 4, 5, 6], tag  # each step once, in order
    for tag in EPOCH_TAGS + SPEED_TAGS[2:]:
        assert [s for s, _ in got[tag]] == [3, 6], tag
    for tag in STEP_TAGS + EPOCH_TAGS:
        # Equal to float32 rounding: the step values are recovered from Keras's running means.
        np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in ref[tag]], rtol=1e-5, err_msg=tag)
    # Epoch 2's mean covers its steps before the kill (carried in the checkpoint) and after.
    step_losses = [v for _, v in got["step_loss"]]
    assert got["epoch_loss"][1][1] == pytest.approx(np.mean(step_losses[3:]), rel=1e-5)
    # The augmentation image after each epoch, drawn from the same state as the uninterrupted run's.
    images = run_logging.read_images(logdir)
    assert [s for s, _ in images] == [3, 6]
    assert images == run_logging.read_images(reference / run_logging.EVENTS_DIR)

    # What TensorBoard itself loads: the same single curve.
    loaded = _load_with_tensorboard(logdir)
    assert [s for s, _ in loaded["step_loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in loaded[run_logging.IMAGE_TAG]] == [3, 6]

    # history.json: one entry per epoch, equal to the uninterrupted run's.
    with open(out / run_logging.HISTORY_FILE) as f:
        history = json.load(f)
    with open(reference / run_logging.HISTORY_FILE) as f:
        ref_history = json.load(f)
    assert [(e["epoch"], e["step"]) for e in history["epochs"]] == [(1, 3), (2, 6)]
    for key in ("loss", "embedding_spread", "learning_rate"):
        np.testing.assert_allclose(
            [e[key] for e in history["epochs"]], [e[key] for e in ref_history["epochs"]], rtol=1e-5, err_msg=key
        )
    assert history["settings"]["dim"] == 32 and history["steps_per_epoch"] == STEPS


def test_plot_script_draws_the_committed_study(tmp_path):
    """benchmarks/plot_results.py reads the committed JSON of docs/results.md's
    CPU study (the run's history.json and the linear evaluation's output) and
    draws both figures; the budgets come from the encoders' labels."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import plot_results
    finally:
        sys.path.pop(0)
    data = os.path.join(REPO, "docs", "figures", "data")
    history, entries, samples_per_epoch = plot_results.load_history(os.path.join(data, "cpu_study_history.json"))
    assert [e["epoch"] for e in entries] == list(range(1, 11)) and samples_per_epoch == 15 * 64
    tasks, points = plot_results.probe_budgets(os.path.join(data, "cpu_study_probe.json"))
    assert tasks == ["words", "instruments"] and [p[0] for p in points] == [0, 2, 5, 10]
    assert points[0][1].startswith("random") and points[-1][1] == "e10"
    with open(os.path.join(data, "cpu_study_probe.json")) as f:
        e10 = json.load(f)["results"]["e10"]
    assert points[-1][3][0] == pytest.approx(100 * e10["average"]["linear"])
    assert plot_results.main([
        "--history", os.path.join(data, "cpu_study_history.json"),
        "--probe", os.path.join(data, "cpu_study_probe.json"), "--out", str(tmp_path), "--name", "study",
    ]) == 0
    for name in ("study_learning_curve.png", "study_probe.png"):
        blob = (tmp_path / name).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) < 150_000
