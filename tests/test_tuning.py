"""KerasTuner search of BYOL-A's augmentation settings (`byola-keras tune`).

Tiny pool (eight 1 s clips), tiny labelled task (tones vs. noise), tiny
learner (d=16, 2 eager steps a trial): the tests check the plumbing, i.e. that
the objective is the linear probe's validation accuracy, that the best
settings are written in a form `byola-keras pretrain --config` takes, that a
re-run resumes, that trained models are freed, and (large) the distributed
chief/worker mode and the Hyperband / Bayesian tuners.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import soundfile as sf

from byola_keras import pretrain as pretrain_lib
from byola_keras import _cli_options
from byola_keras import cluster
from byola_keras import run_logging
from byola_keras.tuning import search
from byola_keras.tuning.hypermodel import OBJECTIVE_NAME, SPACE, BYOLAHyperModel, SearchData

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """An unlabelled pool and a two-class task (low tones vs. white noise)."""
    root = tmp_path_factory.mktemp("tuning_corpus")
    rng = np.random.default_rng(0)
    t = np.arange(SR) / SR
    (root / "pool").mkdir()
    for i in range(8):
        if i % 2:
            wave = 0.3 * np.sin(2 * np.pi * (150 + 60 * i) * t)
        else:
            wave = 0.2 * rng.standard_normal(SR)
        sf.write(root / "pool" / f"p{i}.wav", wave.astype("float32"), SR)
    (root / "task").mkdir()
    rows = ["path,label,split"]
    half = t[: SR // 2]
    k = 0
    for split, count in (("train", 16), ("valid", 8), ("test", 4)):
        for j in range(count):
            if j % 2:
                wave, label = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * half), "tone"
            else:
                wave, label = 0.2 * rng.standard_normal(half.size), "noise"
            sf.write(root / "task" / f"c{k}.wav", wave.astype("float32"), SR)
            rows.append(f"task/c{k}.wav,{label},{split}")
            k += 1
    (root / "task.csv").write_text("\n".join(rows) + "\n")
    return {"pool": str(root / "pool"), "task": str(root / "task.csv")}


def _argv(corpus, out, max_trials, tuner="random", extra=()):
    return [
        "--pool", corpus["pool"], "--task", corpus["task"], "--out", str(out),
        "--tuner", tuner, "--max-trials", str(max_trials), "--budget-steps", "2",
        "--batch-size", "4", "--dim", "16", "--memory-size", "8",
        "--projection-hidden", "32", "--projection-dim", "16",
        "--probe-runs", "1", "--probe-epochs", "10", "--probe-patience", "5",
        "--embed-batch-size", "8", "--run-eagerly", "--jit-compile", "false", "--verbose", "0",
        *extra,
    ]  # fmt: skip


def _run(argv):
    parser = argparse.ArgumentParser()
    _cli_options.tune_options(parser)
    return search.run(parser.parse_args(argv))


def _trial_files(out):
    trials = {}
    project = os.path.join(out, search.PROJECT)
    for name in sorted(os.listdir(project)):
        path = os.path.join(project, name, "trial.json")
        if name.startswith("trial_") and os.path.isfile(path):
            with open(path) as f:
                trials[name] = json.load(f)
    return trials


def _logged_hparams(logdir):
    """The hyperparameters in a trial's TensorBoard folder (HParams session start)."""
    from tensorboard.plugins.hparams import metadata

    found = {}
    for path in run_logging.event_files(str(logdir)):
        for _, _, event in run_logging.read_records(path):
            for value in event.summary.value:
                if value.tag == metadata.SESSION_START_INFO_TAG:
                    info = metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content)
                    found.update({k: v.number_value for k, v in info.hparams.items()})
    return found


def _log_records(out):
    records = []
    folder = os.path.join(out, search.LOG_DIR)
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def test_search_space_build_and_settings(corpus, tmp_path):
    import keras_tuner

    data = SearchData(corpus["pool"], corpus["task"], tmp_path)
    hypermodel = BYOLAHyperModel(
        data, dim=16, dims=[16, 32], tune_fader=True, memory_size=8, projection_hidden=32, projection_dim=16
    )
    hp = keras_tuner.HyperParameters()
    model = hypermodel.build(hp)  # unprepared data: placeholder statistics
    assert model.built and model.compiled
    expected = set(SPACE) | {"dim"}
    assert set(hp.values) == expected
    entries = {entry.name: entry for entry in hp.space}
    for name, (low, high) in SPACE.items():
        assert (entries[name].min_value, entries[name].max_value) == (low, high), name
    assert entries["dim"].values == [16, 32]

    hp.values.update(alpha=0.25, freq_scale_low=0.5, time_scale_high=1.75, virtual_crop_time=1.2, fader_gain=0.5, dim=32)
    settings = hypermodel.settings(hp)
    assert set(settings) <= set(pretrain_lib.DEFAULTS)
    assert settings["alpha"] == 0.25 and settings["dim"] == 32 and settings["fader_gain"] == 0.5
    assert settings["virtual_crop_scale"] == [1.0, 1.2]
    assert settings["freq_scale"][0] == 0.5 and settings["time_scale"][1] == 1.75
    model = hypermodel.build(hp)
    aug = model.augmentation
    assert aug.alpha == 0.25 and aug.fader_gain == 0.5 and model.encoder.d == 32
    assert aug.virtual_crop_scale == (1.0, 1.2) and aug.freq_scale[0] == 0.5

    # Without fader tuning the version's default is kept (v1: no fader).
    plain = BYOLAHyperModel(data, dim=16).settings(None)
    assert plain["fader_gain"] == "default" and plain["alpha"] == 0.4
    with pytest.raises(ValueError, match="version"):
        BYOLAHyperModel(data, version="v3")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SearchData(str(tmp_path / "missing"), corpus["task"], tmp_path / "x").prepare(verbose=False)


def test_search_objective_best_json_resume_and_memory(corpus, tmp_path, monkeypatch):
    out = tmp_path / "search"
    first = _run(_argv(corpus, out, max_trials=2))
    tuner, hypermodel = first["tuner"], first["hypermodel"]
    assert first["fits"] == 2

    # The objective is the probe accuracy (maximized), recorded for every trial.
    assert tuner.oracle.objective.name == OBJECTIVE_NAME == "probe_accuracy"
    assert tuner.oracle.objective.direction == "max"
    done = search.completed_trials(tuner.oracle)
    assert len(done) == 2
    scores = {t.trial_id: t.metrics.get_last_value(OBJECTIVE_NAME) for t in done}
    assert all(0.0 <= s <= 1.0 for s in scores.values()), scores
    assert [r[OBJECTIVE_NAME] for r in hypermodel.fit_history] == [scores[t.trial_id] for t in done]
    # A new search runs the paper's settings first, to measure the gain over them.
    paper = done[0]
    assert paper.hyperparameters.values == search.paper_default_values(tuner.oracle.hyperparameters)
    assert paper.hyperparameters.values["alpha"] == pytest.approx(0.4)
    assert paper.hyperparameters.values["time_scale_low"] == pytest.approx(0.6)
    assert done[1].hyperparameters.values != paper.hyperparameters.values

    # TensorBoard, one folder per trial (KerasTuner's own on TensorFlow, the same
    # layout without TensorFlow elsewhere): hyperparameters, epoch loss, objective.
    for record, trial in zip(hypermodel.fit_history, done):
        session = out / search.TENSORBOARD_DIR / trial.trial_id / "execution0"
        assert run_logging.read_scalars(session)[OBJECTIVE_NAME] == [(2, pytest.approx(scores[trial.trial_id]))]
        train = run_logging.read_scalars(session / "train")
        assert train["epoch_loss"] == [(0, pytest.approx(record["pretrain_loss"], rel=1e-5))]
        assert _logged_hparams(session) == pytest.approx(trial.hyperparameters.values)

    # best.json: the best trial, its settings as pretrain keys.
    with open(out / search.BEST_FILE) as f:
        best = json.load(f)
    assert best[OBJECTIVE_NAME] == max(scores.values())
    assert scores[best["trial_id"]] == best[OBJECTIVE_NAME]
    assert best["trials_completed"] == 2
    assert best["paper_defaults"]["trial_id"] == paper.trial_id
    assert best["gain_over_paper_defaults"] == pytest.approx(best[OBJECTIVE_NAME] - scores[paper.trial_id])
    best_hp = tuner.oracle.get_trial(best["trial_id"]).hyperparameters.values
    assert best["hyperparameters"] == best_hp
    settings = best["settings"]
    assert set(settings) <= set(pretrain_lib.DEFAULTS)
    assert settings["alpha"] == best_hp["alpha"]
    assert settings["time_scale"] == [best_hp["time_scale_low"], best_hp["time_scale_high"]]
    assert settings["virtual_crop_scale"] == [1.0, best_hp["virtual_crop_time"]]
    assert tuner.get_best_hyperparameters(1)[0].values == best_hp
    # The untrained learner's score, for reference, computed once per search.
    assert 0.0 <= best["baseline"][OBJECTIVE_NAME] <= 1.0
    baseline_mtime = os.path.getmtime(out / search.BASELINE_FILE)

    # The recorded objective is the probe accuracy of the trial's trained
    # encoder: the best model, reloaded from its checkpoint, scores the same.
    best_model = tuner.get_best_models(1)[0]
    assert best_model.augmentation.alpha == pytest.approx(best_hp["alpha"])
    rescored = hypermodel.score(best_model)[OBJECTIVE_NAME]
    assert rescored == pytest.approx(best[OBJECTIVE_NAME], abs=1e-6)
    del best_model

    # `byola-keras pretrain --config best.json` takes the settings.
    captured = {}

    def fake_pretrain(audio_dir=None, out=None, config=None, **kwargs):
        overrides = {k: v for k, v in kwargs.items() if k in pretrain_lib.DEFAULTS}
        resolved = pretrain_lib.resolve_settings(config, **overrides)
        captured["settings"] = resolved
        captured["learner"] = pretrain_lib.build_learner(resolved, 0.0, 1.0)

    monkeypatch.setattr(pretrain_lib, "pretrain", fake_pretrain)
    from byola_keras import cli

    code = cli.main(["pretrain", corpus["pool"], "--config", str(out / search.BEST_FILE), "--out", str(tmp_path / "pre")])
    assert code == 0
    resolved, learner = captured["settings"], captured["learner"]
    assert resolved["alpha"] == settings["alpha"] and resolved["dim"] == 16
    assert learner.augmentation.alpha == pytest.approx(settings["alpha"])
    assert learner.augmentation.time_scale == tuple(settings["time_scale"])
    del learner, captured["learner"]
    monkeypatch.undo()

    # Same command again: the finished search is reloaded, nothing retrained.
    before = _trial_files(out)
    again = _run(_argv(corpus, out, max_trials=2))
    assert again["fits"] == 0
    assert _trial_files(out) == before
    assert os.path.getmtime(out / search.BASELINE_FILE) == baseline_mtime
    with open(out / search.BEST_FILE) as f:
        assert json.load(f)[OBJECTIVE_NAME] == best[OBJECTIVE_NAME]

    # A larger --max-trials continues the same search: two more trials only.
    more = _run(_argv(corpus, out, max_trials=4))
    assert more["fits"] == 2
    after = _trial_files(out)
    assert len(after) == 4
    for name, record in before.items():
        assert after[name] == record  # finished trials untouched
    ids = [r["trial_id"] for r in _log_records(out)]
    assert len(ids) == len(set(ids)) == 4  # every trial ran once
    assert len(search.completed_trials(more["tuner"].oracle)) == 4

    # Trained models are freed between trials.
    gc.collect()
    alive = [ref for ref in more["hypermodel"].fitted_models + hypermodel.fitted_models if ref() is not None]
    assert not alive, f"{len(alive)} trained model(s) still alive after the search"

    # Resuming with different defining arguments is refused with a clear message.
    with pytest.raises(SystemExit, match="other settings"):
        _run(_argv(corpus, out, max_trials=4, extra=("--budget-steps", "3")))


def test_imports_stay_light_and_cli_lists_tune():
    """`byola_keras.tuning` and its command-line options import no Keras (the CLI
    picks the backend first); the hypermodel imports no TensorFlow unless it is
    the backend; `byola-keras tune --help` lists the search's options."""
    code = (
        "import sys, byola_keras.tuning, byola_keras.tuning.cli;"
        "assert 'keras' not in sys.modules and 'keras_tuner' not in sys.modules, sorted(sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    result = subprocess.run(
        [sys.executable, "-m", "byola_keras.cli", "tune", "--help"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--pool" in result.stdout and "--budget-steps" in result.stdout
    if keras.backend.backend() == "tensorflow":
        return
    code = "import sys, byola_keras.tuning.hypermodel; assert 'tensorflow' not in sys.modules"
    env["KERAS_BACKEND"] = keras.backend.backend()
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.large
def test_hyperband_and_bayesian(corpus, tmp_path):
    # Hyperband: the second round continues a first-round trial from its checkpoint.
    out = tmp_path / "hyperband"
    summary = _run(
        _argv(corpus, out, max_trials=3, tuner="hyperband",
              extra=("--hyperband-max-epochs", "2", "--hyperband-factor", "2"))
    )  # fmt: skip
    done = search.completed_trials(summary["tuner"].oracle)
    assert len(done) == 3
    continued = [t for t in done if t.hyperparameters.values.get("tuner/initial_epoch", 0) > 0]
    assert continued, [t.hyperparameters.values for t in done]
    assert summary["hypermodel"].fit_history[-1]["pretrain_steps"] == 1.0
    assert os.path.isfile(out / search.BEST_FILE)

    out = tmp_path / "bayesian"
    summary = _run(_argv(corpus, out, max_trials=2, tuner="bayesian"))
    assert len(search.completed_trials(summary["tuner"].oracle)) == 2
    with open(out / search.BEST_FILE) as f:
        best = json.load(f)
    assert 0.0 <= best[OBJECTIVE_NAME] <= 1.0
    paper = search.paper_default_values(summary["tuner"].oracle.hyperparameters)
    assert best["paper_defaults"]["hyperparameters"] == paper  # Bayesian also starts there


def _stop(process):
    if process.poll() is None:
        process.kill()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


@pytest.mark.large
def test_distributed_chief_and_two_workers(corpus, tmp_path):
    """A chief and two workers on loopback share one search; then pretrain with its best.json."""
    out = tmp_path / "distributed"
    host, port = cluster.local_addresses(1, host="127.0.0.1")[0].rsplit(":", 1)
    argv = [sys.executable, "-m", "byola_keras.cli", "tune", *_argv(corpus, out, max_trials=4)]
    base_env = dict(
        os.environ,
        KERAS_BACKEND=keras.backend.backend(),
        PYTHONPATH=REPO,
        KERASTUNER_ORACLE_IP=host,
        KERASTUNER_ORACLE_PORT=port,
        CUDA_VISIBLE_DEVICES="",
    )
    processes = {}
    logs = {}
    deadline = time.time() + 480
    try:
        for tuner_id in ("chief", "tuner0", "tuner1"):
            logs[tuner_id] = open(tmp_path / f"{tuner_id}.log", "w+")
            processes[tuner_id] = subprocess.Popen(
                argv,
                cwd=REPO,
                env=dict(base_env, KERASTUNER_TUNER_ID=tuner_id),
                stdout=logs[tuner_id],
                stderr=subprocess.STDOUT,
            )
        for tuner_id, process in processes.items():
            process.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes.values():
            _stop(process)
        text = {}
        for tuner_id, handle in logs.items():
            handle.seek(0)
            text[tuner_id] = handle.read()
            handle.close()
    report = "\n".join(f"--- {k} (rc {processes[k].returncode})\n{v[-3000:]}" for k, v in text.items())
    assert all(p.returncode == 0 for p in processes.values()), report

    # Both workers ran trials; the chief's oracle recorded all of them.
    records = _log_records(out)
    by_worker = {}
    for record in records:
        by_worker.setdefault(record["tuner_id"], []).append(record["trial_id"])
    assert set(by_worker) == {"tuner0", "tuner1"}, report
    assert all(by_worker.values()), by_worker
    trials = _trial_files(out)
    assert len(trials) == 4 and sum(len(v) for v in by_worker.values()) == 4
    for record in records:
        saved = trials[f"trial_{record['trial_id']}"]
        assert saved["status"] == "COMPLETED"
        value = saved["metrics"]["metrics"][OBJECTIVE_NAME]["observations"][0]["value"][0]
        assert value == pytest.approx(record["metrics"][OBJECTIVE_NAME])
    with open(out / search.BEST_FILE) as f:
        best = json.load(f)
    assert best["trials_completed"] == 4

    # The real command line takes best.json (one tiny pretraining step).
    pre = tmp_path / "pretrain"
    result = subprocess.run(
        [sys.executable, "-m", "byola_keras.cli", "pretrain", corpus["pool"], "--config", str(out / search.BEST_FILE),
         "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--out", str(pre)],
        cwd=REPO,
        env=dict(os.environ, KERAS_BACKEND=keras.backend.backend(), CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert os.path.isfile(pre / "encoder.keras")
    with open(pre / "config.json") as f:
        used = json.load(f)["settings"]
    assert used["alpha"] == best["settings"]["alpha"] and used["dim"] == 16
    assert used["time_scale"] == best["settings"]["time_scale"]
