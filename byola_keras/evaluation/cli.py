"""`byola-keras evaluate ENCODER TASK_MANIFEST...`: linear evaluation from the shell."""

import json
import os
import sys


ENCODER_FILE = "encoder.keras"


def load_encoder(path):
    """Load an encoder for evaluation.

    `path` is a `WaveformEncoder` `.keras` file (its front-end and statistics
    are used), a folder written by `byola-keras pretrain` (holding
    `encoder.keras`), or an official BYOL-A `.pth` file (a bare encoder:
    statistics from each task's train split unless `--stats`).
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        folder = path
        path = os.path.join(folder, ENCODER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Folder '{folder}' holds no {ENCODER_FILE}.")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Encoder file '{path}' does not exist.")
    if path.endswith(".keras"):
        from byola_keras.embed import load_waveform_encoder

        return load_waveform_encoder(path)
    if path.endswith((".pth", ".pt")):
        from byola_keras.weights import load_official

        return load_official(path)
    raise ValueError(
        f"Encoder '{path}': expected a .keras file, a folder with {ENCODER_FILE}, or an official .pth file."
    )




def run_cli(args):
    """Run `byola-keras evaluate` from parsed arguments; prints a table."""
    from byola_keras.evaluation.runner import evaluate, format_table

    encoder = load_encoder(args.encoder)
    mean, std = args.stats if args.stats is not None else (None, None)
    if not args.quiet:
        if mean is not None:
            source = f"mean {mean:.6g}, std {std:.6g}"
        elif args.train_stats or not hasattr(encoder, "min_samples"):
            source = "each task's train split"
        else:
            source = f"the model's (mean {encoder.mean:.6g}, std {encoder.std:.6g})"
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
        htk=args.htk,
        train_stats=args.train_stats,
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
