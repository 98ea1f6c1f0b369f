"""The command-line options of every `byola-keras` subcommand.

This module imports neither Keras nor a backend, so `byola-keras --help` and
every check of the arguments run before a backend starts. Each subcommand has
an options function `NAME_options(parser)`; `byola_keras.cli.COMMANDS` lists
them with the module that does the work.
"""

import argparse
import json
import math
import os

from byola_keras import defaults

BACKENDS = ("tensorflow", "jax", "torch")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (and exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ----------------------------------------------------------------------------
# Argument types: each rejects a bad value with a message naming it.


def _int(text, minimum):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}; got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {text!r}")
    return value


def positive_int(text):
    return _int(text, 1)


def non_negative_int(text):
    return _int(text, 0)


def _float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite; got {text!r}")
    return value


def positive_float(text):
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0; got {text!r}")
    return value


def non_negative_float(text):
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {text!r}")
    return value


def unit_float(text):
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1]; got {text!r}")
    return value


class _Range(argparse.Action):
    """`--flag LO HI` with 0 < LO <= HI."""

    def __call__(self, parser, namespace, values, option_string=None):
        lo, hi = values
        if lo > hi:
            parser.error(f"argument {option_string}: LO must be <= HI; got {lo} {hi}")
        setattr(namespace, self.dest, [lo, hi])


def duration(text):
    """Seconds (> 0) or 'mean' (evaluate's --duration)."""
    if text == "mean":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected positive seconds or 'mean'; got {text!r}")
    return value


# ----------------------------------------------------------------------------
# Options shared by subcommands


def shared_options(parser):
    """Options every subcommand takes."""
    parser.add_argument(
        "--backend", choices=BACKENDS, help="Keras backend (default: KERAS_BACKEND or Keras's)."
    )


def _version_default(key):
    v1, v2 = (defaults.VERSION_DEFAULTS[v][key] for v in defaults.VERSIONS)
    return f"v1 {v1}, v2 {v2}"


# ----------------------------------------------------------------------------
# Subcommands


def pretrain_options(parser):
    """Arguments of `byola-keras pretrain`."""
    common = defaults.COMMON_DEFAULTS
    parser.add_argument("audio_dir", nargs="?", help="Folder of audio files (default: built-in corpus).")
    parser.add_argument(
        "--out", default="runs/byola",
        help="Output folder; a re-run with the same folder resumes from its latest checkpoint.",
    )
    parser.add_argument(
        "--restart", action="store_true",
        help="Discard the checkpoints in --out and start a new run there (the cache is kept).",
    )
    parser.add_argument("--epochs", type=positive_int, help=f"Epochs (default {common['epochs']}).")
    parser.add_argument(
        "--batch-size", type=positive_int, dest="batch_size",
        help=f"Segments per step (default {common['batch_size']}).",
    )
    parser.add_argument("--version", choices=defaults.VERSIONS, help="BYOL-A version (default v1).")
    parser.add_argument(
        "--dim", type=positive_int,
        help=f"Embedding size ({_version_default('dim')}; v1 paper: 512/1024/2048).",
    )
    parser.add_argument(
        "--lr", type=positive_float, help=f"Adam learning rate ({_version_default('lr')})."
    )
    parser.add_argument(
        "--adam-epsilon", type=positive_float, dest="adam_epsilon",
        help=f"Adam epsilon (default {defaults.COMMON_DEFAULTS['adam_epsilon']:g}, PyTorch's).",
    )
    parser.add_argument(
        "--batchnorm", choices=("per_view", "joint"),
        help="BatchNorm over each view on its own (per_view, default, official) or both views at once.",
    )
    parser.add_argument(
        "--init", choices=("torch", "keras"),
        help="Initialisation: PyTorch's defaults (torch, default, official) or Keras's.",
    )
    parser.add_argument("--steps-per-epoch", type=positive_int, dest="steps_per_epoch")
    parser.add_argument("--seed", type=non_negative_int, help="Seed of data order and augmentation.")
    parser.add_argument(
        "--mixed-precision", dest="mixed_precision", choices=("mixed_bfloat16", "mixed_float16")
    )
    parser.add_argument("--alpha", type=unit_float, help=f"Mixup alpha ({_version_default('alpha')}).")
    parser.add_argument(
        "--memory-size", type=positive_int, dest="memory_size",
        help=f"Mixup memory bank size (default {common['memory_size']}).",
    )
    scale = {"type": positive_float, "nargs": 2, "action": _Range}
    parser.add_argument(
        "--freq-scale", dest="freq_scale", metavar=("LO", "HI"), **scale,
        help="Random crop height range, times the mel bins (default %s %s)." % common["freq_scale"],
    )
    parser.add_argument(
        "--time-scale", dest="time_scale", metavar=("LO", "HI"), **scale,
        help="Random crop width range, times the frames (default %s %s)." % common["time_scale"],
    )
    parser.add_argument(
        "--virtual-crop-scale", dest="virtual_crop_scale", metavar=("F", "T"), type=_canvas_scale,
        nargs=2, help="Crop canvas size, times (mel bins, frames) (default %s %s)."
        % common["virtual_crop_scale"],
    )
    parser.add_argument(
        "--fader-gain", dest="fader_gain", type=non_negative_float,
        help=f"Random linear fader gain, 0 = off ({_version_default('fader_gain')}).",
    )
    parser.add_argument("--config", help="JSON file of settings (e.g. the tuner's best).")
    parser.add_argument("--cache-dir", dest="cache_dir", help="Log-mel cache (default OUT/cache).")
    parser.add_argument("--workers", type=non_negative_int, help="Decoding threads.")
    parser.add_argument(
        "--checkpoint-every", dest="checkpoint_every", type=positive_int, metavar="N",
        help="Also write a checkpoint every N steps (default: at the end of each epoch only).",
    )
    parser.add_argument(
        "--no-tensorboard", dest="no_tensorboard", action="store_true",
        help="Do not write TensorBoard logs (OUT/tensorboard); OUT/history.json is written all the same.",
    )
    parser.add_argument(
        "--tensorboard-every", dest="tensorboard_every", type=non_negative_int, default=10, metavar="N",
        help="TensorBoard: loss, embedding spread, learning rate and speed every N steps "
        "(default 10; 0: per epoch only).",
    )
    parser.add_argument(
        "--tensorboard-images", dest="tensorboard_images", type=non_negative_int, default=10, metavar="N",
        help="TensorBoard: an image of a segment and its two augmented views after the first epoch "
        "and every N epochs (default 10; 0: none).",
    )
    parser.add_argument(
        "--data-parallel", dest="data_parallel", action="store_true",
        help="Train over every device (JAX: keras.distribution.DataParallel; TensorFlow: "
        "MirroredStrategy); the batch size must be a multiple of the device count.",
    )
    parser.add_argument(
        "--host-devices", dest="host_devices", type=positive_int,
        help="With --data-parallel: split the CPU into this many devices (to try it without GPUs).",
    )
    parser.add_argument(
        "--verbose", type=int, choices=(0, 1, 2), default=None,
        help="0 silent, 1 progress bar (default on a terminal), 2 one line per epoch.",
    )
    group = parser.add_argument_group(
        "multi-process training (JAX or TensorFlow; also from KERAS_DISTRIBUTION_* or TF_CONFIG)"
    )
    group.add_argument(
        "--coordinator", metavar="HOST:PORT",
        help="Process 0's address (TensorFlow: every process's, comma-separated, in process order).",
    )
    group.add_argument("--num-processes", dest="num_processes", type=positive_int, metavar="N")
    group.add_argument("--process-id", dest="process_id", type=non_negative_int, metavar="I")
    group.add_argument(
        "--detect-cluster", dest="detect_cluster", action="store_true",
        help="JAX: let jax.distributed.initialize() find the processes (SLURM, Open MPI, Cloud TPU).",
    )


def _canvas_scale(text):
    value = _float(text)
    if value < 1.0:
        raise argparse.ArgumentTypeError(f"must be >= 1 (the canvas holds the input); got {text!r}")
    return value


def pretrain_check(args, parser):
    """Checks of `pretrain` arguments that need the file system (no decoding)."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"argument --out: '{args.out}' exists and is not a folder")
    if args.cache_dir and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        parser.error(f"argument --cache-dir: '{args.cache_dir}' exists and is not a folder")
    if args.audio_dir is not None and not os.path.isdir(args.audio_dir):
        what = "does not exist" if not os.path.exists(args.audio_dir) else "is not a folder"
        parser.error(f"argument audio_dir: '{args.audio_dir}' {what}")
    if args.host_devices is not None and not args.data_parallel:
        parser.error("argument --host-devices: only used with --data-parallel")
    process_flags = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in process_flags):
        if not all(v is not None for v in process_flags):
            parser.error("arguments --coordinator, --num-processes, --process-id: give all three, or none")
        if args.process_id >= args.num_processes:
            parser.error(
                f"argument --process-id: must be < --num-processes {args.num_processes}; got {args.process_id}"
            )
        if args.detect_cluster:
            parser.error("argument --detect-cluster: not with --coordinator/--num-processes/--process-id")
    args.config_settings = None
    if args.config:
        args.config_settings = read_config(args.config, parser)


def read_config(path, parser):
    """The settings dict of a `--config` JSON file (a tuner's best file holds it under "settings")."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        parser.error(f"argument --config: '{path}' does not exist")
    except IsADirectoryError:
        parser.error(f"argument --config: '{path}' is a folder, not a JSON file")
    except (OSError, UnicodeDecodeError) as err:
        parser.error(f"argument --config: cannot read '{path}': {err}")
    except json.JSONDecodeError as err:
        parser.error(f"argument --config: '{path}' is not valid JSON ({err})")
    if isinstance(config, dict) and isinstance(config.get("settings"), dict):
        config = config["settings"]
    if not isinstance(config, dict):
        parser.error(f"argument --config: '{path}' must hold a JSON object of settings")
    return config


def convert_options(parser):
    """Arguments of `byola-keras convert`."""
    parser.add_argument("weights", help="official BYOL-A .pth file (state_dict)")
    parser.add_argument("--out", required=True, help="output .keras file (a WaveformEncoder)")
    parser.add_argument(
        "--stats", nargs=2, type=float, required=True, metavar=("MEAN", "STD"),
        help="log-mel normalization statistics stored in the model (compute them from your "
        "audio with the same front-end, e.g. byola_keras.data.compute_norm_stats)",
    )
    parser.add_argument(
        "--htk", action="store_true", help="HTK mel filters (default: Slaney, as the official weights)"
    )
    parser.add_argument(
        "--version", choices=("1", "2"), default=None, help="insist on v1 or v2 (default: infer)"
    )


PROBE_CHOICES = ("linear", "logreg", "both")
LOGREG_C_GRID = (0.01, 0.1, 1.0, 10.0)


def evaluate_options(parser):
    """Arguments of `byola-keras evaluate`."""
    parser.add_argument(
        "encoder",
        help="a WaveformEncoder .keras file, a pretrain output folder, or an official .pth "
        "file (stats from each task's train split unless --stats)",
    )
    parser.add_argument("manifests", nargs="+", metavar="TASK_MANIFEST", help="CSV path,label,split")
    parser.add_argument("--runs", type=int, default=5, help="seeded linear-probe runs (default 5)")
    parser.add_argument(
        "--stats", type=float, nargs=2, metavar=("MEAN", "STD"), help="normalization statistics"
    )
    parser.add_argument(
        "--train-stats", action="store_true",
        help="compute statistics from each task's train split instead of the model's",
    )
    parser.add_argument("--probe", choices=PROBE_CHOICES, default="linear")
    parser.add_argument("--json", metavar="OUT.json", help="write the results as JSON")
    parser.add_argument("--cache-dir", help="embedding cache (default ~/.cache/byola-keras/embeddings)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    parser.add_argument(
        "--duration", type=duration, help="crop/zero-pad clips to S seconds ('mean': the task's average)"
    )
    parser.add_argument(
        "--htk", action="store_true",
        help="HTK mel filters instead of Slaney, for a .pth file (a .keras model knows its own)",
    )
    parser.add_argument(
        "--patience", type=positive_int, default=None,
        help="early stopping (default: the encoder's version's, 10 in v1, 20 in v2)",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="linear probe learning rate")
    parser.add_argument("--epochs", type=int, default=200, help="linear probe epoch limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="clips per encoder call")
    parser.add_argument("--bucket-frames", type=int, help="pad frame counts to multiples of N")
    parser.add_argument("--logreg-c", type=float, nargs="+", default=list(LOGREG_C_GRID), help="C grid")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


EXPORT_FORMATS = ("litert", "onnx", "tf_saved_model")


def export_options(parser):
    """Arguments of `byola-keras export`."""
    parser.add_argument("encoder", metavar="ENCODER", help="a WaveformEncoder .keras file")
    parser.add_argument(
        "--out", required=True, help="SavedModel folder (TF Serving: BASE/<version>), or .onnx/.tflite file"
    )
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="tf_saved_model")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading and checking the export")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--probe-outputs", help=argparse.SUPPRESS)


TUNERS = ("random", "bayesian", "hyperband")


def positive_int_list(text):
    """Comma-separated positive integers, e.g. '512,1024,2048'."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


def tune_options(parser):
    """Arguments of `byola-keras tune`."""
    add = parser.add_argument
    add("--pool", required=True, help="Unlabelled audio: a folder (recursive) or a CSV manifest.")
    add("--task", required=True, help="Labelled task manifest (path,label,split CSV); train/valid are used.")
    add("--out", required=True, help="Search folder (caches, KerasTuner state, best.json); re-run to resume.")
    add("--tuner", choices=TUNERS, default="random")
    add("--max-trials", type=positive_int, default=20, help="Trials in all (Hyperband: a cap).")
    add("--budget-steps", type=positive_int, default=300, help="Pretraining steps per trial.")
    add("--batch-size", type=positive_int, default=64, help="Segments per pretraining step.")
    add("--version", choices=("v1", "v2"), default="v1")
    add("--dim", type=positive_int, help="Embedding width (default: the version's).")
    add("--dims", type=positive_int_list, help="Tune the width among these, e.g. 512,1024,2048.")
    add("--tune-fader", action="store_true", help="Also tune the random linear fader gain.")
    add("--lr", type=float, help="Adam learning rate (default: the version's).")
    add("--tau", type=float, default=defaults.COMMON_DEFAULTS["tau"])
    add("--memory-size", type=positive_int, default=defaults.COMMON_DEFAULTS["memory_size"], help="Mixup memory bank size.")
    add("--projection-hidden", type=positive_int, default=defaults.COMMON_DEFAULTS["projection_hidden"])
    add("--projection-dim", type=positive_int, default=defaults.COMMON_DEFAULTS["projection_dim"])
    add("--probe-runs", type=positive_int, default=3, help="Seeded linear-probe runs per trial (averaged).")
    add("--probe-epochs", type=positive_int, default=200)
    add("--probe-patience", type=positive_int, help="Probe early-stopping patience (default: the version's).")
    add("--duration", type=duration, help="Task clips: seconds (crop/pad) or 'mean'; default whole clips.")
    add("--seed", type=int, default=0, help="Seed of the trials' training and of the tuner.")
    add("--hyperband-max-epochs", type=positive_int, default=3, help="Hyperband: budget_steps in this many units.")
    add("--hyperband-factor", type=positive_int, default=3)
    add("--hyperband-iterations", type=positive_int, default=1)
    add("--embed-batch-size", type=positive_int, default=64, help="Task clips per encoder call.")
    add("--workers", type=int, help="Pool decoding threads.")
    add("--max-seconds", type=float, help="Decode at most this long a window of each pool clip.")
    add("--jit-compile", choices=("auto", "true", "false"), default="auto")
    add("--run-eagerly", action="store_true", help="No compiled steps (tiny budgets, debugging).")
    add("--verbose", type=int, choices=(0, 1, 2), default=1, help="KerasTuner / fit verbosity.")
    add("--no-tensorboard", action="store_true", help="Do not write TensorBoard logs (OUT/tensorboard).")


def embed_options(parser):
    """Arguments of `byola-keras embed`."""
    add = parser.add_argument
    add("encoder", metavar="ENCODER", help="a WaveformEncoder .keras file")
    add("input", metavar="INPUT", help="a folder of audio files (searched recursively) or a CSV "
        "manifest with a 'path' column (e.g. path,label,split; its other columns are kept)")
    add("--out", required=True, help="output folder: OUT/clips (and OUT/frames) read as Parquet "
        "tables; a rerun embeds only new or changed files")
    add("--frames", action="store_true", help="also write frame embeddings with timestamps (OUT/frames)")
    add("--batch-size", type=positive_int, default=32, help="most clips per encoder call (default 32)")
    add("--workers", type=non_negative_int, help="decoding threads (default min(8, CPUs); 0: none)")
    add("--shard", type=shard_spec, metavar="I/N",
        help="embed only shard I (0-based) of N: the files whose path hashes to I; run N of these "
        "(e.g. one per host) with the same --out")
    add("--part-size", type=positive_int, default=1000, metavar="N",
        help="files per committed part (a killed run loses at most one part; default 1000)")
    add("--restart", action="store_true", help="remove the embeddings in --out first")
    add("--quiet", action="store_true", help="no progress line on stderr")


def shard_spec(text):
    """`I/N` -> (I, N) with 0 <= I < N."""
    from byola_keras.corpus import inputs

    try:
        return inputs.parse_shard(text)
    except inputs.InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def embed_check(args, parser):
    """Checks of `embed` arguments that need the file system (no decoding, no backend)."""
    import importlib.util

    from byola_keras.corpus import inputs

    if not os.path.isfile(args.encoder):
        what = "does not exist" if not os.path.exists(args.encoder) else "is not a file"
        parser.error(f"argument ENCODER: '{args.encoder}' {what}")
    if not args.encoder.endswith(".keras"):
        parser.error(
            f"argument ENCODER: '{args.encoder}' is not a .keras file (convert an official .pth "
            "first: byola-keras convert FILE.pth --out encoder.keras --stats MEAN STD)"
        )
    if not os.path.exists(args.input):
        parser.error(f"argument INPUT: '{args.input}' does not exist")
    if not os.path.isdir(args.input):
        try:
            inputs.read_manifest(args.input)
        except inputs.InputError as err:
            parser.error(f"argument INPUT: {err}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"argument --out: '{args.out}' exists and is not a folder")
    if args.restart and args.shard and args.shard[1] > 1:
        parser.error(
            "argument --restart: not with --shard (it would remove the other shards' parts); "
            "remove --out once before starting the shards, or use a new --out"
        )
    if importlib.util.find_spec("pyarrow") is None:
        parser.error('byola-keras embed writes Parquet through pyarrow, which is not installed: '
                     'pip install "byola-keras[embed]"')
