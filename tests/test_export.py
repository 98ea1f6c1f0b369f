"""Exports of a WaveformEncoder (SavedModel, ONNX, LiteRT) equal the Keras model on this backend.

The encoders come from `byola-keras convert` of a synthetic `.pth` file and
from a BYOLA learner (`WaveformEncoder.from_learner`); each is saved as one
`.keras` file, loaded on the current backend and compared with its exports:
the SavedModel run by a process that can import TensorFlow but not Keras or
byola_keras, the ONNX file by onnxruntime and the LiteRT file by ai-edge-litert.
"""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from byola_keras import cli, export
from byola_keras.models import BYOLA, AudioNTT2020, WaveformEncoder
from tests.test_weights import synthetic_state, write_torch_file

STATS = (-4.5, 3.5)
TF_ONLY_CHECK = pathlib.Path(__file__).with_name("_tf_only_serving_check.py")
SAVED_MODEL_CLI = pathlib.Path(sys.executable).with_name("saved_model_cli")


def _tf_env():
    env = dict(os.environ)
    env.pop("KERAS_BACKEND", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _waves():
    rng = np.random.default_rng(5)
    batches = {}
    for key, (batch, samples) in {"a": (2, 16000), "b": (3, 24077), "short": (1, 700)}.items():
        t = np.arange(samples) / 16000.0
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000, (batch, 1)) * t)
        batches[key] = (tone + 0.05 * rng.standard_normal((batch, samples))).astype("float32")
    return batches


def _keras_outputs(model, waves):
    out = model.serving_model.predict_on_batch(waves)
    return {k: keras.ops.convert_to_numpy(v) for k, v in out.items()}


def _assert_close(got, want, what):
    scale = max(1.0, float(np.max(np.abs(want))))
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.max(np.abs(got - want)) <= 1e-4 * scale, (what, float(np.max(np.abs(got - want))), scale)


def _tf_only_outputs(saved_model, waves, tmp_path):
    np.savez(tmp_path / "in.npz", **waves)
    proc = subprocess.run(
        [sys.executable, str(TF_ONLY_CHECK), str(saved_model), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, env=_tf_env(), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`byola-keras convert` of a synthetic v1 .pth, exported as SavedModel and LiteRT by the CLI."""
    folder = tmp_path_factory.mktemp("converted")
    pth = write_torch_file(folder / "v1.pth", synthetic_state(d=128))
    keras_file = folder / "encoder.keras"
    assert cli.main(["convert", pth, "--out", str(keras_file), "--stats", *map(str, STATS)]) == 0
    saved_model = folder / "serving" / "byola" / "1"
    assert cli.main(["export", str(keras_file), "--out", str(saved_model)]) == 0
    tflite = folder / "byola.tflite"
    assert cli.main(["export", str(keras_file), "--out", str(tflite), "--format", "litert"]) == 0
    return keras_file, saved_model, tflite


@pytest.fixture(scope="module")
def from_learner(tmp_path_factory):
    """The encoder of a BYOLA learner, exported to ONNX from memory by the Python API."""
    keras.utils.set_random_seed(3)
    learner = BYOLA(AudioNTT2020(d=64), version="v1", mean=STATS[0], std=STATS[1],
                    projection_hidden=32, projection_dim=16)
    model = WaveformEncoder.from_learner(learner)
    folder = tmp_path_factory.mktemp("learner")
    model.save(folder / "encoder.keras")
    worst = export.export(model, folder / "byola.onnx", format="onnx")
    return folder / "encoder.keras", folder / "byola.onnx", worst


def test_saved_model_in_tensorflow_alone_equals_keras(converted, tmp_path):
    keras_file, saved_model, _ = converted
    model = keras.saving.load_model(keras_file)
    assert isinstance(model, WaveformEncoder) and (model.mean, model.std) == STATS
    waves = _waves()
    served = _tf_only_outputs(saved_model, waves, tmp_path)
    assert list(served["input_names"]) == ["waveform"]
    assert list(served["output_names"]) == ["embedding", "frame_embeddings"]
    for key, batch in waves.items():
        want = _keras_outputs(model, batch)
        for name in ("embedding", "frame_embeddings"):
            _assert_close(served[f"{key}/{name}"], want[name], f"{key}/{name}")
    assert served["short/frame_embeddings"].shape == (1, 1, 128)  # padded to 1,120 samples
    assert served["b/frame_embeddings"].shape == (3, (1 + 24077 // 160) // 8, 128)


def test_litert_equals_keras(converted):
    keras_file, _, tflite = converted
    model = keras.saving.load_model(keras_file)
    for key, batch in _waves().items():
        got = export.run_artifact(str(tflite), "litert", batch)
        want = _keras_outputs(model, batch)
        for name in ("embedding", "frame_embeddings"):
            _assert_close(got[name], want[name], f"litert {key}/{name}")


def test_onnx_from_a_learner_equals_keras(from_learner):
    keras_file, onnx_file, worst = from_learner
    assert worst is not None and worst <= 1e-4
    model = keras.saving.load_model(keras_file)
    assert model.encoder.d == 64
    for key, batch in _waves().items():
        got = export.run_artifact(str(onnx_file), "onnx", batch)
        want = _keras_outputs(model, batch)
        for name in ("embedding", "frame_embeddings"):
            _assert_close(got[name], want[name], f"onnx {key}/{name}")


def test_saved_model_cli_shows_the_waveform_signature(converted):
    _, saved_model, _ = converted
    assert SAVED_MODEL_CLI.is_file(), f"saved_model_cli not found next to {sys.executable}"
    show = subprocess.run(
        [str(SAVED_MODEL_CLI), "show", "--dir", str(saved_model), "--tag_set", "serve",
         "--signature_def", "serving_default"],
        capture_output=True, text=True, env=_tf_env(),
    )
    assert show.returncode == 0, show.stderr[-3000:]
    text = show.stdout
    assert "inputs['waveform']" in text and "shape: (-1, -1)\n" in text
    assert "outputs['embedding']" in text and "shape: (-1, 128)\n" in text
    assert "outputs['frame_embeddings']" in text and "shape: (-1, -1, 128)\n" in text


def test_verification_catches_a_mismatch(converted):
    model = keras.saving.load_model(converted[0])
    probes = export.probe_waveforms(model.min_samples)
    served = {}
    for i, waves in enumerate(probes):
        for name, value in _keras_outputs(model, waves).items():
            served[f"{i}/{name}"] = value
    assert export._verify(model, served, "same") == 0.0
    served["1/frame_embeddings"] = served["1/frame_embeddings"] + 1e-2 * max(1.0, np.abs(served["1/frame_embeddings"]).max())
    with pytest.raises(export.ExportVerificationError, match="frame_embeddings.*differs"):
        export._verify(model, served, "perturbed")


def test_export_errors_name_the_argument(converted, tmp_path, capsys):
    keras_file, saved_model, _ = converted
    assert cli.main(["export", str(keras_file), "--out", str(saved_model)]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli.main(["export", str(keras_file), "--out", str(tmp_path / "m.onnx"), "--format", "litert"]) == 1
    assert ".tflite" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "missing.keras"), "--out", str(tmp_path / "x")]) == 1
    assert "missing.keras" in capsys.readouterr().err
    AudioNTT2020(d=16).save(tmp_path / "bare.keras")
    assert cli.main(["export", str(tmp_path / "bare.keras"), "--out", str(tmp_path / "y")]) == 1
    assert "not a WaveformEncoder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.large
def test_official_weights_served_match_official_outputs(shared, reference, tmp_path):
    # The v1 README pipeline: HTK (torchaudio) filters, its example statistics,
    # the official d512 weights; the SavedModel's embedding of the fixture
    # waveform must match the official code's.
    weights = shared / "reference" / "weights" / "AudioNTT2020-BYOLA-64x96d512.pth"
    mean, std = (repr(float(v)) for v in reference["norm_stats_v1_readme"])
    keras_file = tmp_path / "encoder.keras"
    assert cli.main(["convert", str(weights), "--out", str(keras_file), "--stats", mean, std, "--htk"]) == 0
    out = tmp_path / "official" / "1"
    assert cli.main(["export", str(keras_file), "--out", str(out)]) == 0
    served = _tf_only_outputs(out, {"wave": reference["wave"][None]}, tmp_path)
    expected = reference["wave_emb_v1_d512"]
    assert np.max(np.abs(served["wave/embedding"] - expected)) <= 1e-4 * np.max(np.abs(expected))
