"""Export a BYOL-A encoder as a TensorFlow SavedModel for TF Serving.

The exported graph takes raw audio and does everything the Keras model needs:

    waveform [batch, samples] float32, mono 16 kHz, any length
      -> zero-pad at the end up to `min_waveform_samples(encoder)`
      -> `LogMelSpectrogram` (the same layer as training; Slaney or HTK filters)
      -> `(x - mean) / std` (the pre-normalization statistics)
      -> encoder in inference mode (BatchNorm moving statistics, no dropout)
      -> {"embedding": [batch, d], "frame_embeddings": [batch, frames', d]}

under one signature, `serving_default`, with the input `waveform` and the
outputs `embedding` and `frame_embeddings`; batch and samples are both dynamic.
No augmentation layer is part of the export.

Short clips: the centred STFT pads 512 samples on each side by reflection,
which needs more than 512 samples, and each of the encoder's 2x2 max-pools
halves the frames (flooring), so the encoder needs `2 ** num_blocks` log-mel
frames (8 for AudioNTT2020, 4 for AudioNTT2022) to give one frame embedding.
Waveforms shorter than `max(513, (2 ** num_blocks - 1) * 160)` samples (1,120
= 70 ms for v1, 513 = 32 ms for v2) are zero-padded at the end to that length
inside the graph; longer ones are left alone, so for them the export computes
exactly what the Keras model computes.

Keras writes SavedModels from the TensorFlow backend. Under JAX or PyTorch,
`export_saved_model` hands the encoder (its `.keras` file, or its config and a
temporary weights file) to a child process of the same Python with
`KERAS_BACKEND=tensorflow`, which does the export; TensorFlow is imported only
there (and, under the TensorFlow backend, in this process).

The export is reloaded with `tf.saved_model.load` and checked against the Keras
model (silence, noise and a tone; several lengths and batch sizes; tolerance
1e-3 * max(1, max|x|) + 1e-4 * |x|) before `export_saved_model` returns; under
JAX/PyTorch the SavedModel's outputs are also checked against the model run on
the calling backend. The SavedModel is written to a hidden sibling folder and
renamed into place once verified, so a TF Serving instance watching the base
path never loads a partial version.

    byola-keras export runs/encoder.keras --out serving/byola/1
"""

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np

from byola_keras import frontend

__all__ = [
    "ExportVerificationError",
    "SavedModelInfo",
    "export_saved_model",
    "load_encoder",
    "min_waveform_samples",
    "read_norm_stats",
    "run_cli",
]

SIGNATURE_NAME = "serving_default"
INPUT_NAME = "waveform"
OUTPUT_NAMES = ("embedding", "frame_embeddings")
NORM_STATS_FILE = "norm_stats.json"
RTOL = 1e-4
ATOL = 1e-3

_WORKER_RESULT = "result.json"
_WORKER_PROBES = "probes.npz"


class ExportVerificationError(RuntimeError):
    """The reloaded SavedModel does not reproduce the Keras model's embeddings."""


@dataclasses.dataclass(frozen=True)
class SavedModelInfo:
    """What `export_saved_model` wrote.

    Attributes:
        path: absolute path of the SavedModel folder.
        signature: the signature name (`serving_default`).
        inputs: `{name: (dtype, shape)}`, shapes with `None` for dynamic sizes.
        outputs: `{name: (dtype, shape)}`.
        min_samples: waveforms shorter than this are zero-padded to it.
        mean: pre-normalization mean baked into the graph.
        std: pre-normalization standard deviation baked into the graph.
        htk: whether the front-end uses HTK mel filters.
        max_abs_error: largest |SavedModel - Keras| over the verification
            probes, or `None` when the export was not verified.
    """

    path: str
    signature: str
    inputs: dict
    outputs: dict
    min_samples: int
    mean: float
    std: float
    htk: bool
    max_abs_error: float | None = None

    def summary(self):
        """A few lines describing the serving signature, for people."""

        def fmt(specs):
            return [
                f"    {name}: {dtype} [{', '.join('?' if s is None else str(s) for s in shape)}]"
                for name, (dtype, shape) in specs.items()
            ]

        lines = [f"signature '{self.signature}':", "  inputs:"]
        lines += fmt(self.inputs)
        lines += ["  outputs:"]
        lines += fmt(self.outputs)
        lines += [
            f"  waveform: mono {frontend.SAMPLE_RATE} Hz float32; shorter than "
            f"{self.min_samples} samples is zero-padded",
            f"  front-end: log-mel ({'HTK' if self.htk else 'Slaney'} filters), "
            f"(x - {self.mean:.6g}) / {self.std:.6g}",
        ]
        if self.max_abs_error is not None:
            lines.append(
                f"  verified against the Keras model: max abs difference {self.max_abs_error:.3g}"
            )
        return "\n".join(lines)


def min_waveform_samples(encoder):
    """The shortest waveform the exported graph feeds to `encoder` unpadded.

    The reflect-padded STFT needs `n_fft // 2 + 1` samples and the encoder needs
    `2 ** num_blocks` frames (8 for AudioNTT2020, 4 for AudioNTT2022).
    """
    frames = 2 ** _num_blocks(encoder)
    return max(frontend.N_FFT // 2 + 1, (frames - 1) * frontend.HOP_LENGTH)


def _register_classes():
    """Import the modules whose `register_keras_serializable` classes a file may name."""
    import byola_keras.layers  # noqa: F401
    import byola_keras.models  # noqa: F401


def load_encoder(path):
    """Load an encoder from a `.keras` file or an official BYOL-A `.pth` file."""
    _register_classes()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Encoder file not found: {path}")
    if path.endswith(".keras"):
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as err:
            raise ValueError(f"Could not load the Keras encoder {path}: {err}") from err
    elif path.endswith(".pth"):
        from byola_keras import weights  # lazy: only for .pth files

        model = weights.load_official(path)
    else:
        raise ValueError(f"Encoder must be a .keras file (or an official .pth file); got {path}")
    _check_encoder(model, path)
    return model


def read_norm_stats(path):
    """`(mean, std, htk)` from a `norm_stats.json` file.

    The file holds `{"mean": m, "std": s}` and optionally `"frontend"`
    (`"slaney"` or `"htk"`; `htk` is None when the key is absent).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Normalization statistics not found: {path} (give them with --stats MEAN STD "
            "or stats=(mean, std))."
        )
    try:
        with open(path) as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}).") from err
    if not isinstance(record, dict) or "mean" not in record or "std" not in record:
        raise ValueError(f'{path}: expected {{"mean": float, "std": float}}.')
    if record["mean"] is None or record["std"] is None:
        note = f" {record['note']}" if record.get("note") else ""
        raise ValueError(
            f"{path}: 'mean'/'std' are not set.{note} Give them with --stats MEAN STD "
            "or stats=(mean, std)."
        )
    mean, std = _check_stats((record["mean"], record["std"]), path)
    frontend_name = record.get("frontend")
    if frontend_name not in (None, "slaney", "htk"):
        raise ValueError(f"{path}: 'frontend' must be 'slaney' or 'htk'; got {frontend_name!r}.")
    return mean, std, None if frontend_name is None else frontend_name == "htk"


def export_saved_model(
    encoder, export_dir, stats=None, htk=None, verify=True, overwrite=False
):
    """Write a TF Serving SavedModel: waveform in, clip and frame embeddings out.

    Args:
        encoder: a BYOL-A encoder (`AudioNTT2020`, `AudioNTT2022` or any
            functional model on `[B, n_mels, frames, 1]` log-mels with a layer
            named `frame_embeddings`), or the path of a `.keras` file holding one.
        export_dir: the SavedModel folder; TF Serving wants
            `<model_base_path>/<version>`, e.g. `serving/byola/1`.
        stats: `(mean, std)` of the pre-normalization. When `None` and `encoder`
            is a path, read from the `norm_stats.json` beside it.
        htk: use HTK-scale mel filters (must match the encoder's training).
            `None`: the `"frontend"` recorded in `norm_stats.json` when the
            statistics come from there, else False (Slaney, as the official
            weights).
        verify: reload the SavedModel and check it against the Keras model
            (raises `ExportVerificationError` on a mismatch).
        overwrite: replace a non-empty `export_dir`.

    Returns:
        A `SavedModelInfo` (path, signature, shapes; `.summary()` for people).
    """
    export_dir = os.path.abspath(os.fspath(export_dir))
    _check_export_dir(export_dir, overwrite)
    if stats is not None:
        stats = _check_stats(stats, "stats")
    encoder_path = None
    if isinstance(encoder, (str, os.PathLike)):
        encoder_path = os.fspath(encoder)
        if stats is None:
            stats_path = os.path.join(os.path.dirname(encoder_path), NORM_STATS_FILE)
            *stats, recorded_htk = read_norm_stats(stats_path)
            if htk is None:
                htk = recorded_htk
        encoder = load_encoder(encoder_path)
    elif isinstance(encoder, keras.Model):
        _check_encoder(encoder, "encoder")
        if stats is None:
            raise ValueError(
                "stats=(mean, std) is required when `encoder` is a model (the "
                "pre-normalization statistics used in training)."
            )
    else:
        raise TypeError(
            f"`encoder` must be a keras.Model or a path to a .keras file; got {type(encoder)}."
        )
    mean, std = _check_stats(stats, "stats")
    htk = bool(htk)

    # Written to a hidden sibling folder, verified, then renamed into place, so
    # that a TF Serving instance watching the base path never sees a partial or
    # failed version.
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(export_dir)}.partial-", dir=parent)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide it from a server user
    try:
        info = _export_staged(encoder, encoder_path, staging, mean, std, htk, verify)
        if os.path.isdir(export_dir):
            _check_export_dir(export_dir, overwrite)
            shutil.rmtree(export_dir)
        os.rename(staging, export_dir)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return dataclasses.replace(info, path=export_dir)


def _export_staged(encoder, encoder_path, export_dir, mean, std, htk, verify):
    if keras.backend.backend() == "tensorflow":
        info, _ = _export_tensorflow(encoder, export_dir, mean, std, htk, verify)
        return info
    with tempfile.TemporaryDirectory(prefix="byola_export_") as tmp:
        spec = {
            **_hand_over(encoder, encoder_path, tmp),
            "export_dir": export_dir,
            "mean": mean,
            "std": std,
            "htk": htk,
            "verify": bool(verify),
            "work_dir": tmp,
        }
        info = _run_worker(spec)
        if verify:
            with np.load(os.path.join(tmp, _WORKER_PROBES)) as data:
                served = {k: data[k] for k in data.files}
            max_err = _check_probes(encoder, served, mean, std, htk, keras.backend.backend())
            info = dataclasses.replace(info, max_abs_error=max(info.max_abs_error, max_err))
    return info


# --------------------------------------------------------------------------
# Helpers shared by every backend.


def _num_blocks(encoder):
    blocks = getattr(encoder, "num_blocks", None)
    if blocks is None:
        blocks = sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in encoder.layers)
    return int(blocks)


def _check_encoder(model, where):
    if not isinstance(model, keras.Model):
        raise TypeError(f"{where}: expected a keras.Model encoder, got {type(model)}.")
    try:
        model.get_layer("frame_embeddings")
        shape = tuple(model.input.shape)
    except (ValueError, AttributeError) as err:
        raise ValueError(
            f"{where}: not a BYOL-A encoder (need a functional model on "
            f"[batch, n_mels, frames, 1] log-mels with a layer named 'frame_embeddings'; {err})."
        ) from err
    if len(shape) != 4 or shape[1] is None or shape[3] != 1:
        raise ValueError(
            f"{where}: the encoder input must be [batch, n_mels, frames, 1]; got {shape}."
        )


def _check_stats(stats, where):
    try:
        mean, std = (float(v) for v in stats)
    except (TypeError, ValueError) as err:  # not two numbers
        raise ValueError(f"{where}: expected (mean, std) numbers; got {stats!r}.") from err
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"{where}: need a finite mean and a positive std; got {stats!r}.")
    return mean, std


def _check_export_dir(export_dir, overwrite):
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise FileExistsError(f"Export path exists and is not a folder: {export_dir}")
    if os.path.isdir(export_dir) and os.listdir(export_dir) and not overwrite:
        raise FileExistsError(
            f"Export folder is not empty: {export_dir} (use overwrite=True / --overwrite, "
            "or a new version number)."
        )


def _two_output_model(encoder):
    """The encoder with both outputs: `[clip embedding, frame embeddings]`."""
    return keras.Model(
        encoder.input,
        [encoder.output, encoder.get_layer("frame_embeddings").output],
        name=f"{encoder.name}_serving",
    )


def _pad_numpy(waves, min_samples):
    short = max(min_samples - waves.shape[1], 0)
    return np.pad(waves, ((0, 0), (0, short))) if short else waves


def _waveform_model(encoder, mean, std, htk):
    """The Keras model's own path as one model: front-end, `(x - mean) / std`, encoder.

    Run with `predict_on_batch` (compiled on every backend; JAX's op-by-op
    dispatch would compile each op anew for every waveform length).
    """
    from byola_keras.layers import LogMelSpectrogram

    waveform = keras.Input((None,), name=INPUT_NAME)
    log_mel = LogMelSpectrogram(n_mels=int(encoder.input.shape[1]), htk=htk, dtype="float32")(
        waveform
    )
    embedding, frames = _two_output_model(encoder)((log_mel - mean) / std)
    return keras.Model(waveform, {"embedding": embedding, "frame_embeddings": frames})


def _keras_outputs(model, encoder, waves):
    waves = _pad_numpy(np.asarray(waves, dtype="float32"), min_waveform_samples(encoder))
    out = model.predict_on_batch(waves)
    return {name: np.asarray(keras.ops.convert_to_numpy(out[name])) for name in OUTPUT_NAMES}


def _probe_batches(min_samples):
    """Silence, noise and a 440 Hz tone at several lengths and batch sizes."""
    rng = np.random.default_rng(1234)
    sr = frontend.SAMPLE_RATE
    batches = []
    for samples, batch in ((sr // 2, 3), (sr, 1), (int(3.7 * sr), 2), (min_samples // 2, 2)):
        t = np.arange(samples) / sr
        rows = [
            np.zeros(samples),
            0.1 * rng.standard_normal(samples),
            0.5 * np.sin(2 * np.pi * 440.0 * t),
        ]
        order = [2] if batch == 1 else [0, 1, 2][:batch]
        batches.append(np.stack([rows[i] for i in order]).astype("float32"))
    return batches


def _compare(got, want, label):
    """Max abs error; raises `ExportVerificationError` beyond the tolerance.

    Tolerance: `ATOL * max(1, max|want|) + RTOL * |want|`. The absolute part
    scales with the output's magnitude: float32 STFTs differ across backends by
    rounding, and near-silent mel bins turn that into ~1e-3 in the log-mel,
    which a trained encoder carries through at the scale of its activations
    (about 1e-2 out of 200 for the official d512 weights on a pure tone).
    """
    if got.shape != want.shape:
        raise ExportVerificationError(
            f"{label}: the SavedModel gives shape {got.shape}, the Keras model {want.shape}."
        )
    got = got.astype("float64")
    want = want.astype("float64")
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    err = np.abs(got - want)
    if not np.all(np.isfinite(got)) or np.any(err > ATOL * scale + RTOL * np.abs(want)):
        raise ExportVerificationError(
            f"{label}: the SavedModel differs from the Keras model (max abs difference "
            f"{np.nanmax(err):.3g}, tolerance {ATOL} * {scale:.3g} + {RTOL} * |x|)."
        )
    return float(err.max()) if err.size else 0.0


def _check_probes(encoder, served, mean, std, htk, where):
    """Compare the SavedModel's probe outputs with the Keras model's."""
    max_err = 0.0
    model = _waveform_model(encoder, mean, std, htk)
    for i, waves in enumerate(_probe_batches(min_waveform_samples(encoder))):
        want = _keras_outputs(model, encoder, waves)
        for name in OUTPUT_NAMES:
            label = f"{name}, batch {waves.shape[0]} x {waves.shape[1]} samples ({where} Keras)"
            max_err = max(max_err, _compare(served[f"{i}/{name}"], want[name], label))
    return max_err


# --------------------------------------------------------------------------
# The TensorFlow side (this process under the TensorFlow backend, else a child).


def _export_tensorflow(encoder, export_dir, mean, std, htk, verify):
    import tensorflow as tf

    from byola_keras.layers import LogMelSpectrogram

    trunk = _two_output_model(encoder)
    front_end = LogMelSpectrogram(
        n_mels=int(encoder.input.shape[1]), htk=htk, dtype="float32", name="log_mel"
    )
    min_samples = min_waveform_samples(encoder)

    def serve(waveform):
        short = tf.maximum(min_samples - tf.shape(waveform)[1], 0)
        waveform = tf.pad(waveform, [[0, 0], [0, short]])
        x = (front_end(waveform) - mean) / std
        embedding, frames = trunk(x, training=False)  # no dropout, BN moving statistics
        return {
            "embedding": tf.cast(embedding, tf.float32),
            "frame_embeddings": tf.cast(frames, tf.float32),
        }

    archive = keras.export.ExportArchive()
    archive.track(trunk)
    fn = archive.add_endpoint(
        SIGNATURE_NAME,
        serve,
        input_signature=[tf.TensorSpec([None, None], tf.float32, name=INPUT_NAME)],
    )
    archive.write_out(export_dir, verbose=False)

    concrete = fn.get_concrete_function()
    inputs = {INPUT_NAME: ("float32", (None, None))}
    outputs = {
        name: (tensor.dtype.name, tuple(tensor.shape.as_list()))
        for name, tensor in sorted(concrete.structured_outputs.items())
    }
    info = SavedModelInfo(
        path=export_dir,
        signature=SIGNATURE_NAME,
        inputs=inputs,
        outputs=outputs,
        min_samples=min_samples,
        mean=mean,
        std=std,
        htk=htk,
    )
    if not verify:
        return info, None

    loaded = tf.saved_model.load(export_dir)
    if SIGNATURE_NAME not in loaded.signatures:
        raise ExportVerificationError(
            f"{export_dir}: no '{SIGNATURE_NAME}' signature after reloading "
            f"(found {list(loaded.signatures)})."
        )
    signature = loaded.signatures[SIGNATURE_NAME]
    input_names = sorted(signature.structured_input_signature[1])
    output_names = sorted(signature.structured_outputs)
    if input_names != [INPUT_NAME] or output_names != sorted(OUTPUT_NAMES):
        raise ExportVerificationError(
            f"{export_dir}: signature has inputs {input_names} and outputs {output_names}; "
            f"expected [{INPUT_NAME!r}] and {sorted(OUTPUT_NAMES)}."
        )
    served = {}
    for i, waves in enumerate(_probe_batches(min_samples)):
        result = signature(**{INPUT_NAME: tf.constant(waves)})
        for name in OUTPUT_NAMES:
            served[f"{i}/{name}"] = result[name].numpy()
    max_err = _check_probes(encoder, served, mean, std, htk, "TensorFlow")
    return dataclasses.replace(info, max_abs_error=max_err), served


def _hand_over(encoder, encoder_path, tmp):
    """How the child process gets the encoder: its `.keras` file, or config + weights.

    A byola_keras encoder goes as its (JSON) config and a `.weights.h5` file:
    `model.save()` on JAX/PyTorch imports TensorFlow (Keras's serializer checks
    for `tf.TensorShape`), which this process should not need.
    """
    if encoder_path is not None and encoder_path.endswith(".keras"):
        return {"encoder": os.path.abspath(encoder_path)}
    cls = type(encoder)
    name = keras.saving.get_registered_name(cls)
    if cls.__module__.startswith("byola_keras.") and name != cls.__name__:
        try:
            config = json.loads(json.dumps(encoder.get_config()))
        except TypeError:
            config = None
        if config is not None:
            weights_path = os.path.join(tmp, "encoder.weights.h5")
            encoder.save_weights(weights_path)
            return {
                "encoder_class": name,
                "encoder_config": config,
                "encoder_weights": weights_path,
            }
    path = os.path.join(tmp, "encoder.keras")
    encoder.save(path)
    return {"encoder": path}


def _take_over(spec):
    """The child's side of `_hand_over`."""
    if "encoder" in spec:
        return load_encoder(spec["encoder"])
    _register_classes()
    cls = keras.saving.get_registered_object(spec["encoder_class"])
    if cls is None:
        raise ValueError(f"Unknown encoder class {spec['encoder_class']!r}.")
    encoder = cls.from_config(spec["encoder_config"])
    encoder.load_weights(spec["encoder_weights"])
    _check_encoder(encoder, spec["encoder_class"])
    return encoder


def _run_worker(spec):
    """Run `_worker_main(spec)` in a TensorFlow-backend child process."""
    if importlib.util.find_spec("tensorflow") is None:
        raise RuntimeError(
            "Exporting a SavedModel needs TensorFlow, which is not installed "
            "(pip install 'byola-keras[tensorflow]')."
        )
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "tensorflow"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_root, env.get("PYTHONPATH")) if p
    )
    code = (
        "import sys; from byola_keras.export import _worker_main; "
        "sys.exit(_worker_main(sys.argv[1]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    result_path = os.path.join(spec["work_dir"], _WORKER_RESULT)
    result = None
    if os.path.isfile(result_path):
        with open(result_path) as f:
            result = json.load(f)
    if proc.returncode == 0 and result and result.get("ok"):
        info = result["info"]
        for key in ("inputs", "outputs"):
            info[key] = {k: (dtype, tuple(shape)) for k, (dtype, shape) in info[key].items()}
        return SavedModelInfo(**info)
    tail = "\n".join((proc.stderr or "").strip().splitlines()[-25:])
    if result and result.get("error_type") == "ExportVerificationError":
        raise ExportVerificationError(result["message"])
    message = result["message"] if result else f"exit status {proc.returncode}"
    raise RuntimeError(
        f"SavedModel export in a TensorFlow subprocess (KERAS_BACKEND=tensorflow) failed: "
        f"{message}\n--- subprocess stderr (last lines) ---\n{tail}"
    )


def _worker_main(spec_json):
    """Child-process entry point (KERAS_BACKEND=tensorflow): export, verify, report."""
    spec = json.loads(spec_json)
    work_dir = spec["work_dir"]
    try:
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(f"worker runs on backend {keras.backend.backend()!r}")
        encoder = _take_over(spec)
        info, served = _export_tensorflow(
            encoder, spec["export_dir"], spec["mean"], spec["std"], spec["htk"], spec["verify"]
        )
        if served is not None:
            np.savez(os.path.join(work_dir, _WORKER_PROBES), **served)
        result = {"ok": True, "info": dataclasses.asdict(info)}
        status = 0
    except Exception as err:  # reported to the parent, which raises
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error_type": type(err).__name__, "message": str(err)}
        status = 1
    with open(os.path.join(work_dir, _WORKER_RESULT), "w") as f:
        json.dump(result, f)
    return status


# --------------------------------------------------------------------------
# Command line: byola-keras export ENCODER --out DIR/1


def run_cli(args):
    try:
        info = export_saved_model(
            args.encoder,
            args.out,
            stats=args.stats,
            htk=args.htk,
            verify=not args.no_verify,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        print(f"byola-keras export: error: {err}", file=sys.stderr)
        return 1
    print(info.summary())
    print(f"SavedModel written to {info.path}")
    if not os.path.basename(info.path).isdigit():
        print(
            "note: TF Serving loads MODEL_BASE_PATH/<version>/; name the folder with a "
            "version number (e.g. --out serving/byola/1).",
        )
    return 0
