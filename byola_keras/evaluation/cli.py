"""`byola-keras evaluate ENCODER TASK_MANIFEST...`: linear evaluation from the shell."""

import json
import math
import os
import sys

from byola_keras.evaluation import probes
from byola_keras.evaluation import runner

NORM_STATS_FILE = "norm_stats.json"
ENCODER_FILE = "encoder.keras"


def read_norm_stats(path):
    """`(mean, std, htk)` from a `norm_stats.json`.

    The file holds `{"mean": number, "std": number}` and optionally
    `"frontend": "slaney" | "htk"`. `mean` and `std` may both be null (a
    converted encoder whose statistics are unknown): then `(None, None, htk)`,
    and the evaluation computes them from each task's train split.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read normalization statistics '{path}': {err}") from err
    if not isinstance(stats, dict):
        raise ValueError(f"'{path}' must hold a JSON object {{\"mean\": number, \"std\": number}}.")
    frontend = stats.get("frontend", "slaney")
    if frontend not in ("slaney", "htk"):
        raise ValueError(f"'{path}': 'frontend' must be 'slaney' or 'htk'; got {frontend!r}.")
    htk = frontend == "htk"
    if stats.get("mean", 0) is None and stats.get("std", 0) is None:
        return None, None, htk
    try:
        mean, std = float(stats["mean"]), float(stats["std"])
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(
            f"'{path}' must hold {{\"mean\": number, \"std\": number}}; got {stats!r}."
        ) from err
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"'{path}': need a finite mean and a positive std; got {mean}, {std}.")
    return mean, std, htk


def load_encoder(path):
    """Load an encoder for evaluation: `(encoder, mean, std, htk)`.

    `path` is a `.keras` encoder (statistics from a `norm_stats.json` beside
    it, else None), a folder written by `byola-keras pretrain` (holding
    `encoder.keras` and `norm_stats.json`), or an official BYOL-A `.pth` file
    (loaded with `byola_keras.weights.load_official`; statistics None, i.e.
    computed from each task's train split). The statistics are None when
    unknown; `htk` says whether norm_stats.json names the HTK front-end.
    """
    import keras

    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        folder = path
        path = os.path.join(folder, ENCODER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Folder '{folder}' holds no {ENCODER_FILE}.")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Encoder file '{path}' does not exist.")
    if path.endswith(".keras"):
        import byola_keras.models  # noqa: F401 - registers the encoder classes

        encoder = keras.saving.load_model(path, compile=False)
        stats_path = os.path.join(os.path.dirname(path), NORM_STATS_FILE)
        if os.path.isfile(stats_path):
            return (encoder, *read_norm_stats(stats_path))
        return encoder, None, None, False
    if path.endswith((".pth", ".pt")):
        from byola_keras.weights import load_official

        encoder = load_official(path)
        return encoder, None, None, False
    raise ValueError(
        f"Encoder '{path}': expected a .keras file, a folder with {ENCODER_FILE}, or an official .pth file."
    )


def _duration(text):
    import argparse

    if text == "mean":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected positive seconds or 'mean'; got {text!r}")
    return value


def add_cli_arguments(parser):
    """Arguments of `byola-keras evaluate`."""
    parser.add_argument(
        "encoder",
        help="a .keras encoder (stats from norm_stats.json beside it), a pretrain output "
        "folder, or an official .pth file (stats from each task's train split)",
    )
    parser.add_argument("manifests", nargs="+", metavar="TASK_MANIFEST", help="CSV path,label,split")
    parser.add_argument("--runs", type=int, default=5, help="seeded linear-probe runs (default 5)")
    parser.add_argument(
        "--stats", type=float, nargs=2, metavar=("MEAN", "STD"), help="normalization statistics"
    )
    parser.add_argument(
        "--train-stats",
        action="store_true",
        help="compute statistics from each task's train split even if norm_stats.json exists",
    )
    parser.add_argument("--probe", choices=runner.PROBE_CHOICES, default="linear")
    parser.add_argument("--json", metavar="OUT.json", help="write the results as JSON")
    parser.add_argument("--cache-dir", help="embedding cache (default ~/.cache/byola-keras/embeddings)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    parser.add_argument(
        "--duration", type=_duration, help="crop/zero-pad clips to S seconds ('mean': the task's average)"
    )
    parser.add_argument(
        "--htk",
        action="store_true",
        help="HTK mel filters instead of Slaney (also when norm_stats.json says frontend: htk)",
    )
    parser.add_argument(
        "--patience", type=int, default=None,
        help="early stopping (default: the encoder's version's, 10 in v1, 20 in v2)",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="linear probe learning rate")
    parser.add_argument("--epochs", type=int, default=200, help="linear probe epoch limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="clips per encoder call")
    parser.add_argument("--bucket-frames", type=int, help="pad frame counts to multiples of N")
    parser.add_argument(
        "--logreg-c", type=float, nargs="+", default=list(probes.DEFAULT_C_GRID), help="C grid"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def run_cli(args):
    """Run `byola-keras evaluate` from parsed arguments; prints a table."""
    from byola_keras.evaluation.runner import evaluate, format_table

    encoder, mean, std, htk = load_encoder(args.encoder)
    if args.stats is not None:
        mean, std = args.stats
    elif args.train_stats:
        mean = std = None
    if not args.quiet:
        source = "each task's train split" if mean is None else f"mean {mean:.6g}, std {std:.6g}"
        print(f"Normalization statistics: {source}", file=sys.stderr, flush=True)
    results = evaluate(
        encoder,
        args.manifests,
        mean=mean,
        std=std,
        runs=args.runs,
        probe=args.probe,
        cache_dir=False if args.no_cache else args.cache_dir,
        duration=args.duration,
        seed=args.seed,
        htk=args.htk or htk,
        patience=args.patience,
        learning_rate=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        bucket_frames=args.bucket_frames,
        logreg_grid=args.logreg_c,
        verbose=not args.quiet,
    )
    results["encoder"] = os.path.abspath(args.encoder)
    print(format_table(results))
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        if not args.quiet:
            print(f"Wrote {args.json}", file=sys.stderr)
    return 0
