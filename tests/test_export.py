"""SavedModel export: waveform in, embeddings out, served by TensorFlow alone.

One export per backend run (module fixture); under JAX and PyTorch it goes
through the TensorFlow child process. The SavedModel is then run by a process
that can import TensorFlow but not Keras or byola_keras, and by
`saved_model_cli`, and compared with the Keras model on the current backend.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from byola_keras import cli, export
from byola_keras.layers import LogMelSpectrogram
from byola_keras.models import AudioNTT2020

STATS = (-4.5, 3.5)
D = 64
TF_ONLY_CHECK = pathlib.Path(__file__).with_name("_tf_only_serving_check.py")
SAVED_MODEL_CLI = pathlib.Path(sys.executable).with_name("saved_model_cli")


def _tf_env():
    env = dict(os.environ)
    env.pop("KERAS_BACKEND", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _encoder():
    """AudioNTT2020(d=64) with random weights and non-trivial BatchNorm statistics."""
    encoder = AudioNTT2020(d=D)
    rng = np.random.default_rng(7)
    for index in (1, 2, 3):
        bn = encoder.get_layer(f"bn{index}")
        bn.gamma.assign(rng.uniform(0.5, 1.5, 64).astype("float32"))
        bn.beta.assign(rng.normal(0.0, 0.2, 64).astype("float32"))
        bn.moving_mean.assign(rng.normal(0.0, 0.3, 64).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.3, 3.0, 64).astype("float32"))
    return encoder


def _keras_embeddings(encoder, waves, stats=STATS):
    """The Keras model's own path, written out here (not export's helper):
    `LogMelSpectrogram` -> `(x - mean) / std` -> encoder / `encoder.frame_encoder`,
    compiled (`predict_on_batch`) so that JAX does not compile op by op."""
    mean, std = stats
    waveform = keras.Input((None,))
    x = (LogMelSpectrogram()(waveform) - mean) / std
    model = keras.Model(waveform, [encoder(x), encoder.frame_encoder(x)])
    embedding, frames = model.predict_on_batch(waves)
    return keras.ops.convert_to_numpy(embedding), keras.ops.convert_to_numpy(frames)


def _waves(batch, samples, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 16000.0
    tone = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000, (batch, 1)) * t)
    return (tone + 0.05 * rng.standard_normal((batch, samples))).astype("float32")


def _assert_close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    encoder = _encoder()
    path = tmp_path_factory.mktemp("serving") / "byola" / "1"
    info = export.export_saved_model(encoder, path, stats=STATS)
    return encoder, path, info


def test_export_info_and_files(exported):
    encoder, path, info = exported
    assert (path / "saved_model.pb").is_file()
    assert (path / "variables").is_dir()
    assert info.path == str(path)
    assert info.signature == "serving_default"
    assert info.inputs == {"waveform": ("float32", (None, None))}
    assert info.outputs == {
        "embedding": ("float32", (None, D)),
        "frame_embeddings": ("float32", (None, None, D)),
    }
    assert info.min_samples == 7 * 160
    assert info.max_abs_error is not None and info.max_abs_error < 1e-3
    assert "waveform" in info.summary() and "frame_embeddings" in info.summary()


def test_tensorflow_only_process_matches_keras(exported, tmp_path):
    encoder, path, _ = exported
    waves = {
        "a": _waves(2, 16000, seed=1),  # 1 s -> 101 frames -> 12 frame embeddings
        "b": _waves(3, 24077, seed=2),  # odd length, batch 3
        "short": _waves(1, 700, seed=3),  # below the 1,120-sample minimum: padded
    }
    np.savez(tmp_path / "in.npz", **waves)
    proc = subprocess.run(
        [sys.executable, str(TF_ONLY_CHECK), str(path), str(tmp_path / "in.npz"),
         str(tmp_path / "out.npz")],
        capture_output=True, text=True, env=_tf_env(), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as data:
        out = {k: data[k] for k in data.files}
    assert list(out["input_names"]) == ["waveform"]
    assert list(out["output_names"]) == ["embedding", "frame_embeddings"]
    for key in ("a", "b"):
        embedding, frames = _keras_embeddings(encoder, waves[key])
        assert out[f"{key}/embedding"].shape == (waves[key].shape[0], D)
        assert out[f"{key}/frame_embeddings"].shape == (
            waves[key].shape[0], (1 + waves[key].shape[1] // 160) // 8, D,
        )
        _assert_close(out[f"{key}/embedding"], embedding)
        _assert_close(out[f"{key}/frame_embeddings"], frames)
    padded = np.pad(waves["short"], ((0, 0), (0, 1120 - 700)))
    embedding, frames = _keras_embeddings(encoder, padded)
    assert out["short/frame_embeddings"].shape == (1, 1, D)
    _assert_close(out["short/embedding"], embedding)
    _assert_close(out["short/frame_embeddings"], frames)


def test_saved_model_cli_show_and_run(exported, tmp_path):
    encoder, path, _ = exported
    assert SAVED_MODEL_CLI.is_file(), f"saved_model_cli not found next to {sys.executable}"
    # TF 2.21's --input_exprs only takes Python literals (no np.zeros(...)),
    # so the batch goes in as an .npy file.
    zeros = np.zeros((2, 16000), dtype=np.float32)
    np.save(tmp_path / "zeros.npy", zeros)
    common = ["--dir", str(path), "--tag_set", "serve", "--signature_def", "serving_default"]
    commands = {
        "show": [str(SAVED_MODEL_CLI), "show", *common],
        "run": [str(SAVED_MODEL_CLI), "run", *common, "--inputs",
                f"waveform={tmp_path / 'zeros.npy'}", "--outdir", str(tmp_path / "out")],
    }
    procs = {  # both at once: each spends most of its time importing TensorFlow
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_tf_env())
        for name, cmd in commands.items()
    }
    outputs = {name: proc.communicate() for name, proc in procs.items()}
    show, run = (
        subprocess.CompletedProcess(commands[n], procs[n].returncode, *outputs[n])
        for n in ("show", "run")
    )
    assert show.returncode == 0, show.stderr[-3000:]
    text = show.stdout
    assert "inputs['waveform']" in text
    assert "outputs['embedding']" in text and "outputs['frame_embeddings']" in text
    assert "shape: (-1, -1)\n" in text
    assert f"shape: (-1, {D})\n" in text and f"shape: (-1, -1, {D})\n" in text
    assert "DT_FLOAT" in text

    assert run.returncode == 0, run.stderr[-3000:]
    assert "embedding" in run.stdout and "frame_embeddings" in run.stdout
    served = np.load(tmp_path / "out" / "embedding.npy")
    served_frames = np.load(tmp_path / "out" / "frame_embeddings.npy")
    assert served.shape == (2, D) and served_frames.shape == (2, 12, D)
    embedding, frames = _keras_embeddings(encoder, zeros)
    _assert_close(served, embedding)
    _assert_close(served_frames, frames)


def test_cli_export_end_to_end(tmp_path, capsys):
    encoder = _encoder()
    encoder.save(tmp_path / "encoder.keras")
    (tmp_path / "norm_stats.json").write_text(json.dumps({"mean": STATS[0], "std": STATS[1]}))
    out = tmp_path / "serving" / "1"
    code = cli.main(["export", str(tmp_path / "encoder.keras"), "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "waveform: float32 [?, ?]" in printed.out
    assert f"embedding: float32 [?, {D}]" in printed.out
    assert f"frame_embeddings: float32 [?, ?, {D}]" in printed.out
    assert "verified against the Keras model" in printed.out
    assert str(out) in printed.out
    assert (out / "saved_model.pb").is_file()

    # A second export into the same, now non-empty folder is refused.
    code = cli.main(["export", str(tmp_path / "encoder.keras"), "--out", str(out)])
    assert code == 1
    assert "not empty" in capsys.readouterr().err


@pytest.mark.large
def test_cli_exports_official_weights_matching_official_outputs(shared, reference, tmp_path):
    # The v1 README pipeline: HTK (torchaudio) filters, its example statistics,
    # the official d512 weights; the served embedding of the fixture waveform
    # must match the official code's.
    weights = shared / "reference" / "weights" / "AudioNTT2020-BYOLA-64x96d512.pth"
    mean, std = (float(v) for v in reference["norm_stats_v1_readme"])
    out = tmp_path / "official" / "1"
    code = cli.main(["export", str(weights), "--out", str(out), "--htk",
                     "--stats", repr(mean), repr(std)])
    assert code == 0
    np.savez(tmp_path / "in.npz", wave=reference["wave"][None])
    proc = subprocess.run(
        [sys.executable, str(TF_ONLY_CHECK), str(out), str(tmp_path / "in.npz"),
         str(tmp_path / "out.npz")],
        capture_output=True, text=True, env=_tf_env(), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as data:
        served = data["wave/embedding"]
        frames = data["wave/frame_embeddings"]
    assert frames.shape == (1, 12, 512)
    np.testing.assert_allclose(served, reference["wave_emb_v1_d512"], rtol=1e-4, atol=1e-3)


def test_cli_reports_missing_stats(tmp_path, capsys):
    path = tmp_path / "encoder.keras"  # no norm_stats.json beside it
    path.write_bytes(b"")
    code = cli.main(["export", str(path), "--out", str(tmp_path / "out" / "1")])
    assert code == 1
    err = capsys.readouterr().err
    assert "norm_stats.json" in err and str(tmp_path) in err
    assert not (tmp_path / "out").exists()


def test_cli_reports_missing_encoder_and_bad_stats(tmp_path, capsys):
    code = cli.main(["export", str(tmp_path / "nope.keras"), "--out", str(tmp_path / "o"),
                     "--stats", "0", "1"])
    assert code == 1
    assert "nope.keras" in capsys.readouterr().err
    code = cli.main(["export", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o")])
    assert code == 1
    assert "--stats" in capsys.readouterr().err  # no norm_stats.json beside it
    code = cli.main(["export", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o"),
                     "--stats", "0", "-1"])
    assert code == 1
    assert "positive std" in capsys.readouterr().err


def test_argument_errors():
    encoder = AudioNTT2020(d=16)
    with pytest.raises(ValueError, match="stats"):
        export.export_saved_model(encoder, "unused")
    with pytest.raises(ValueError, match="positive std"):
        export.export_saved_model(encoder, "unused", stats=(0.0, 0.0))
    with pytest.raises(TypeError, match="keras.Model"):
        export.export_saved_model(object(), "unused", stats=(0.0, 1.0))
    plain = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="frame_embeddings"):
        export.export_saved_model(plain, "unused", stats=(0.0, 1.0))


def test_read_norm_stats(tmp_path):
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps({"mean": -5.5, "std": 5.0}))
    assert export.read_norm_stats(path) == (-5.5, 5.0, None)
    path.write_text(json.dumps({"mean": -5.5, "std": 5.0, "frontend": "htk"}))
    assert export.read_norm_stats(path) == (-5.5, 5.0, True)
    path.write_text(json.dumps({"mean": None, "std": None, "frontend": "slaney", "note": "X"}))
    with pytest.raises(ValueError, match="not set. X"):
        export.read_norm_stats(path)
    path.write_text(json.dumps({"mean": -5.5, "std": -1.0}))
    with pytest.raises(ValueError, match="positive std"):
        export.read_norm_stats(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        export.read_norm_stats(path)


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_export_is_staged_and_moved_into_place(tmp_path, monkeypatch):
    encoder = AudioNTT2020(d=16)
    base = tmp_path / "serving"
    calls = []

    def fake_export(encoder, encoder_path, staging, mean, std, htk, verify):
        calls.append((staging, htk))
        assert pathlib.Path(staging).parent == base and not pathlib.Path(staging).name.isdigit()
        pathlib.Path(staging, "saved_model.pb").write_text(f"version {len(calls)}")
        if len(calls) == 3:
            raise export.ExportVerificationError("mismatch")
        return export.SavedModelInfo(staging, "serving_default", {}, {}, 1120, mean, std, htk)

    monkeypatch.setattr(export, "_export_staged", fake_export)
    info = export.export_saved_model(encoder, base / "1", stats=(0.0, 1.0))
    assert info.path == str(base / "1")
    assert (base / "1" / "saved_model.pb").read_text() == "version 1"
    assert (base / "1").stat().st_mode & 0o055 == 0o055 & ~_umask()  # not mkdtemp's 0700
    with pytest.raises(FileExistsError, match="not empty"):
        export.export_saved_model(encoder, base / "1", stats=(0.0, 1.0))
    export.export_saved_model(encoder, base / "1", stats=(0.0, 1.0), htk=True, overwrite=True)
    assert (base / "1" / "saved_model.pb").read_text() == "version 2"
    assert calls[-1][1] is True
    with pytest.raises(export.ExportVerificationError):
        export.export_saved_model(encoder, base / "1", stats=(0.0, 1.0), overwrite=True)
    # A failed export leaves the previous version and no partial folder.
    assert (base / "1" / "saved_model.pb").read_text() == "version 2"
    assert sorted(p.name for p in base.iterdir()) == ["1"]


def test_min_waveform_samples():
    from byola_keras.models import AudioNTT2022

    assert export.min_waveform_samples(AudioNTT2020(d=16)) == 1120  # 8 frames
    assert export.min_waveform_samples(AudioNTT2022(d=1040)) == 513  # reflect padding


def test_verification_compares_with_tolerance():
    want = np.linspace(-2.0, 2.0, 12, dtype="float32").reshape(3, 4)
    assert export._compare(want + 1e-5, want, "x") < 1e-4
    with pytest.raises(export.ExportVerificationError, match="max abs difference"):
        export._compare(want + 1e-2, want, "embedding")
    with pytest.raises(export.ExportVerificationError, match="shape"):
        export._compare(want[:2], want, "embedding")


def test_worker_reports_its_error(tmp_path):
    # The child's entry point, run here: it writes the error for the parent.
    spec = {
        "encoder": str(tmp_path / "missing.keras"),
        "export_dir": str(tmp_path / "out"),
        "mean": 0.0,
        "std": 1.0,
        "htk": False,
        "verify": False,
        "work_dir": str(tmp_path),
    }
    assert export._worker_main(json.dumps(spec)) == 1
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["ok"] is False
    if keras.backend.backend() == "tensorflow":
        assert result["error_type"] == "FileNotFoundError"
        assert "missing.keras" in result["message"]
    else:
        assert "backend" in result["message"]


def test_worker_failure_is_surfaced(tmp_path, monkeypatch):
    def fake_run(cmd, env, **kwargs):
        assert env["KERAS_BACKEND"] == "tensorflow"
        spec = json.loads(cmd[-1])
        result = {"ok": False, "error_type": "ValueError", "message": "bad encoder file x.keras"}
        pathlib.Path(spec["work_dir"], "result.json").write_text(json.dumps(result))
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\nValueError: bad encoder")

    monkeypatch.setattr(export.subprocess, "run", fake_run)
    spec = {"work_dir": str(tmp_path)}
    with pytest.raises(RuntimeError, match="(?s)TensorFlow subprocess.*x.keras.*ValueError"):
        export._run_worker(spec)

    def crash(cmd, env, **kwargs):
        return subprocess.CompletedProcess(cmd, -11, "", "Segmentation fault")

    (tmp_path / "result.json").unlink()
    monkeypatch.setattr(export.subprocess, "run", crash)
    with pytest.raises(RuntimeError, match="(?s)exit status -11.*Segmentation fault"):
        export._run_worker(spec)


_NO_TF_SCRIPT = """
import sys
from byola_keras import export
from byola_keras.models import AudioNTT2020
assert "tensorflow" not in sys.modules, "importing byola_keras.export imported TensorFlow"

seen = {}

def fake_worker(spec):  # stands in for the TensorFlow child process
    seen.update(spec)
    return export.SavedModelInfo(
        spec["export_dir"], "serving_default", {}, {}, 1120, 0.0, 1.0, False
    )

export._run_worker = fake_worker
export.export_saved_model(AudioNTT2020(d=16), sys.argv[1], stats=(0.0, 1.0), verify=False)
assert seen["encoder_class"] == "byola_keras>AudioNTT2020", seen
assert "tensorflow" not in sys.modules, "export_saved_model imported TensorFlow in the caller"
print("ok")
"""


def test_caller_never_imports_tensorflow_on_jax_or_torch(tmp_path):
    # Run apart: pytest's own process has TensorFlow (keras.utils.set_random_seed
    # imports it). Under the TensorFlow backend this checks JAX instead.
    backend = keras.backend.backend()
    backend = "jax" if backend == "tensorflow" else backend
    env = dict(os.environ, KERAS_BACKEND=backend)
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TF_SCRIPT, str(tmp_path / "out" / "1")],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok"
