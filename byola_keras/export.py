"""Export a `WaveformEncoder` for serving with Keras's own exporter (`model.export`).

    byola-keras export encoder.keras --out serving/byola/1                 # TF SavedModel
    byola-keras export encoder.keras --out byola.onnx --format onnx        # onnxruntime
    byola-keras export encoder.keras --out byola.tflite --format litert    # LiteRT

Every artifact takes `waveform`, `[batch, samples]` float32 mono 16 kHz audio
of any length, and returns `embedding` `[batch, d]` and `frame_embeddings`
`[batch, frames, d]`: `WaveformEncoder.serving_model` (zero-padding of short
clips, log-mel front-end, normalization, encoder in inference mode). The
SavedModel serves it as its `serving_default` signature.

Keras exports these formats from the TensorFlow backend; under JAX or PyTorch,
`export()` runs `byola-keras export --backend tensorflow` in a child process.
Before `export()` returns, the artifact is reloaded with its own runtime
(TensorFlow, onnxruntime, LiteRT), run on probe waveforms (silence, noise and
a tone, several lengths and batch sizes) and compared with the Keras model
(`|artifact - keras| <= 1e-4 * max(1, max |keras|)`); from JAX or PyTorch also
with the model on that backend. Artifacts are written under a temporary name
and moved into place once verified, so a server watching the path never loads
a partial or failed export.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from byola_keras import frontend

__all__ = ["FORMATS", "ExportVerificationError", "export", "probe_waveforms", "run_artifact"]

FORMATS = {"tf_saved_model": "", "onnx": ".onnx", "litert": ".tflite"}
TOLERANCE = 1e-4
ONNX_OPSET = 13  # tf2onnx converts the front-end's |rfft| (ComplexAbs) at opset 13
OUTPUT_NAMES = ("embedding", "frame_embeddings")


class ExportVerificationError(RuntimeError):
    """The reloaded artifact does not reproduce the Keras model's embeddings."""


def probe_waveforms(min_samples):
    """Silence, noise and a 440 Hz tone at several lengths and batch sizes (a list of batches)."""
    rng = np.random.default_rng(1234)
    batches = []
    for samples, batch in ((8000, 3), (16000, 1), (min_samples // 2, 2), (20000, 2)):
        t = np.arange(samples) / frontend.SAMPLE_RATE
        rows = [np.zeros(samples), 0.1 * rng.standard_normal(samples), 0.5 * np.sin(2 * np.pi * 440.0 * t)]
        batches.append(np.stack(rows[-batch:]).astype("float32"))
    return batches


def run_artifact(path, format, waves):
    """`{name: array}` of an exported artifact on a `[batch, samples]` float32 batch."""
    if format == "tf_saved_model":
        import tensorflow as tf

        signature = tf.saved_model.load(path).signatures["serving_default"]
        return {k: v.numpy() for k, v in signature(waveform=tf.constant(waves)).items()}
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, {"waveform": waves})))
    if format == "litert":
        from ai_edge_litert.interpreter import Interpreter

        return dict(Interpreter(path).get_signature_runner()(waveform=waves))
    raise ValueError(f"`format` must be one of {sorted(FORMATS)}; got {format!r}.")


def _compare(got, want, label):
    if set(got) != set(OUTPUT_NAMES):
        raise ExportVerificationError(f"{label}: outputs {sorted(got)}, expected {sorted(OUTPUT_NAMES)}.")
    worst = 0.0
    for name in OUTPUT_NAMES:
        a, b = np.asarray(got[name], "float64"), np.asarray(want[name], "float64")
        if a.shape != b.shape:
            raise ExportVerificationError(f"{label} {name}: shape {a.shape}, Keras gives {b.shape}.")
        error = float(np.max(np.abs(a - b))) if a.size else 0.0
        limit = TOLERANCE * max(1.0, float(np.max(np.abs(b))) if b.size else 0.0)
        if not np.all(np.isfinite(a)) or error > limit:
            raise ExportVerificationError(
                f"{label} {name}: differs from the Keras model by {error:.3g} (tolerance {limit:.3g})."
            )
        worst = max(worst, error)
    return worst


def _verify(model, served, label):
    """Max abs difference between the artifact's probe outputs and the Keras model's."""
    import keras

    worst = 0.0
    for i, waves in enumerate(probe_waveforms(model.min_samples)):
        want = {k: keras.ops.convert_to_numpy(v) for k, v in model.serving_model.predict_on_batch(waves).items()}
        got = {name: served[f"{i}/{name}"] for name in OUTPUT_NAMES}
        worst = max(worst, _compare(got, want, f"{label}, batch {waves.shape}"))
    return worst


def _check_target(path, format, overwrite):
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {sorted(FORMATS)}; got {format!r}.")
    if FORMATS[format] and not path.endswith(FORMATS[format]):
        raise ValueError(f"{path}: a {format} export must end with {FORMATS[format]!r}.")
    if os.path.exists(path) and not overwrite:
        if not os.path.isdir(path) or os.listdir(path):
            raise FileExistsError(f"{path} exists (use overwrite=True / --overwrite, or a new version).")


def export(model, path, format="tf_saved_model", verify=True, overwrite=False, probe_outputs=None):
    """Export a `WaveformEncoder` (or its `.keras` file) and check the artifact.

    Args:
        model: a `WaveformEncoder`, or the path of a `.keras` file holding one.
        path: the SavedModel folder (TF Serving wants `<base>/<version>`), or
            the `.onnx` / `.tflite` file.
        format: `"tf_saved_model"`, `"onnx"` or `"litert"`.
        verify: reload the artifact and compare it with the Keras model
            (raises `ExportVerificationError` beyond the tolerance).
        overwrite: replace an existing artifact.
        probe_outputs: a `.npz` file to write the artifact's probe outputs to.

    Returns:
        The largest |artifact - Keras| over the probes (None without `verify`).
    """
    import keras

    from byola_keras import embed

    path = os.path.abspath(os.fspath(path))
    _check_target(path, format, overwrite)
    keras_file = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    if keras_file is not None:
        model = embed.load_waveform_encoder(keras_file)
    if keras.backend.backend() != "tensorflow":
        return _export_in_tensorflow_process(model, keras_file, path, format, verify, overwrite)

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        target = staging if format == "tf_saved_model" else os.path.join(staging, os.path.basename(path))
        kwargs = {"opset_version": ONNX_OPSET} if format == "onnx" else {}
        import tensorflow as tf

        model.serving_model.export(
            target,
            format=format,
            input_signature=[tf.TensorSpec([None, None], tf.float32, name="waveform")],
            verbose=False,
            **kwargs,
        )
        worst = None
        if verify:
            served = {}
            for i, waves in enumerate(probe_waveforms(model.min_samples)):
                for name, value in run_artifact(target, format, waves).items():
                    served[f"{i}/{name}"] = value
            worst = _verify(model, served, f"{format} export")
            if probe_outputs:
                np.savez(probe_outputs, **served)
        if format == "tf_saved_model":
            os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide it from a server's user
            if os.path.isdir(path):
                shutil.rmtree(path)
            os.rename(staging, path)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return worst


def _export_in_tensorflow_process(model, keras_file, path, format, verify, overwrite):
    import keras

    with tempfile.TemporaryDirectory(prefix="byola_export_") as tmp:
        if keras_file is None:
            keras_file = os.path.join(tmp, "model.keras")
            model.save(keras_file)
        probes = os.path.join(tmp, "probes.npz")
        command = [sys.executable, "-m", "byola_keras.cli", "export", keras_file, "--out", path,
                   "--format", format, "--backend", "tensorflow", "--probe-outputs", probes]
        command += ["--no-verify"] * (not verify) + ["--overwrite"] * overwrite
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"Export in a TensorFlow process failed:\n{tail}")
        if not verify:
            return None
        with np.load(probes) as data:
            served = {k: data[k] for k in data.files}
    return _verify(model, served, f"{format} export vs {keras.backend.backend()}")



def run_cli(args):
    try:
        worst = export(
            args.encoder,
            args.out,
            format=args.format,
            verify=not args.no_verify,
            overwrite=args.overwrite,
            probe_outputs=args.probe_outputs,
        )
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        print(f"byola-keras export: error: {error}", file=sys.stderr)
        return 1
    print(f"{args.format} written to {os.path.abspath(args.out)}")
    print("  input: waveform float32 [batch, samples], mono 16 kHz")
    print("  outputs: embedding float32 [batch, d], frame_embeddings float32 [batch, frames, d]")
    if worst is not None:
        print(f"  verified against the Keras model: max abs difference {worst:.3g}")
    if args.format == "tf_saved_model" and not os.path.basename(os.path.abspath(args.out)).isdigit():
        print("note: TF Serving loads MODEL_BASE_PATH/<version>/; e.g. --out serving/byola/1.")
    return 0
