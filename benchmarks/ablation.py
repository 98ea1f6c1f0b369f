#!/usr/bin/env python
"""Augmentation ablation (the v1 paper's Table II, on the generated tasks).

Pretrains one encoder per augmentation variant under the same budget, by
calling `byola-keras pretrain` in a subprocess with a `--config` JSON of
AugmentationModule switches, then evaluates each like linear_eval.py and
prints one table (test accuracy % per task and the average):

    mixup+crop        Mixup + Random Resize Crop (the default BYOL-A v1 module)
    mixup only        Mixup, no RRC
    crop only         RRC, no Mixup
    no pre-norm       Mixup + RRC without Pre-Normalization
    no post-norm      Mixup + RRC without Post-Normalization

All variants share seed, epochs, batch size, steps per epoch, embedding size,
the learner's form (`--batchnorm per_view|joint`, `--init torch|keras`,
`--adam-epsilon`; defaults: the official ones, from byola_keras.pretrain)
and the decoded log-mel cache. A re-run with the same --out resumes or reuses
each variant's pretraining (pretrain resumes from its checkpoint; a finished
run only rewrites encoder.keras). Pretraining audio: the tasks' unlabelled
pool (TASKS_DIR/pool) unless --audio-dir.

    python benchmarks/ablation.py --epochs 20 --batch-size 128 --out runs/ablation
    python benchmarks/ablation.py --quick     # tiny smoke run (1 epoch of 2 steps, 64 clips)
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import linear_eval  # noqa: E402

BOTH = {"use_pre_norm": True, "use_mixup": True, "use_resize_crop": True, "use_post_norm": True}
VARIANTS = {
    "mixup+crop": dict(BOTH),
    "mixup only": {**BOTH, "use_resize_crop": False},
    "crop only": {**BOTH, "use_mixup": False},
    "no pre-norm": {**BOTH, "use_pre_norm": False},
    "no post-norm": {**BOTH, "use_post_norm": False},
}
QUICK_AUDIO_FILES = 64


def _slug(name):
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def variant_config(switches, args):
    """The `--config` JSON of one variant (keys of byola_keras.pretrain.DEFAULTS)."""
    config = {"version": "v1", "dim": args.dim, "alpha": args.alpha, "seed": args.seed, **switches}
    for key in ("lr", "batchnorm", "init", "adam_epsilon"):
        if getattr(args, key, None) is not None:
            config[key] = getattr(args, key)
    return config


def quick_audio_dir(audio_dir, out):
    """A folder of links to the first few audio files of `audio_dir` (for --quick)."""
    from byola_keras.data import find_audio_files

    folder = os.path.join(out, "quick-audio")
    os.makedirs(folder, exist_ok=True)
    for i, path in enumerate(find_audio_files(audio_dir)[:QUICK_AUDIO_FILES]):
        link = os.path.join(folder, f"{i:03d}{os.path.splitext(path)[1]}")
        if not os.path.lexists(link):
            os.symlink(path, link)
    return folder


def pretrain_variant(name, switches, args, audio_dir):
    """Run `byola-keras pretrain` for one variant; returns its output folder."""
    out = os.path.join(args.out, _slug(name))
    os.makedirs(out, exist_ok=True)
    config_path = os.path.join(out, "ablation_config.json")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(variant_config(switches, args), f, indent=1)
    command = [sys.executable, "-m", "byola_keras.cli", "pretrain"]
    if audio_dir:
        command.append(audio_dir)
    command += [
        "--out", out,
        "--config", config_path,
        "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size),
        "--cache-dir", os.path.join(args.out, "logmel-cache"),
        "--backend", args.backend,
        "--verbose", "2",
    ]
    if args.steps_per_epoch:
        command += ["--steps-per-epoch", str(args.steps_per_epoch)]
    command += args.pretrain_arg
    print(f"\n== pretraining {name}: {' '.join(command)}", flush=True)
    with _common.Timer() as timer:
        code = subprocess.call(command)
    if code != 0:
        raise SystemExit(f"Pretraining '{name}' failed with exit code {code} (output folder {out}).")
    if not os.path.isfile(os.path.join(out, "encoder.keras")):
        raise SystemExit(f"Pretraining '{name}' wrote no encoder.keras in {out}.")
    return out, timer.seconds


def build_parser():
    parser = argparse.ArgumentParser(
        description="BYOL-A augmentation ablation: pretrain each variant, then linear evaluation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--out", default=os.path.join(_common.RESULTS_DIR, "ablation"), help="pretraining outputs"
    )
    parser.add_argument(
        "--audio-dir", help="pretraining audio (default TASKS_DIR/pool, else the built-in corpus)"
    )
    parser.add_argument(
        "--variants", help=f"comma-separated subset of: {', '.join(VARIANTS)} (default: all)"
    )
    parser.add_argument("--epochs", type=int, help="pretraining epochs (default 20; --quick: 1)")
    parser.add_argument("--batch-size", type=int, help="pretraining batch (default 256; --quick: 16)")
    parser.add_argument("--steps-per-epoch", type=int, help="pretraining steps per epoch (--quick: 2)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size (the paper's ablation: 512)")
    parser.add_argument("--alpha", type=float, default=0.4, help="mixup alpha (v1: 0.4)")
    parser.add_argument("--lr", type=float, help="pretraining learning rate (default: pretrain's, 3e-4)")
    parser.add_argument(
        "--batchnorm", choices=("per_view", "joint"),
        help="BatchNorm batches of the learner (default: pretrain's, per_view as the official code)",
    )
    parser.add_argument(
        "--init", choices=("torch", "keras"),
        help="weight initialisation (default: pretrain's, torch as the official code)",
    )
    parser.add_argument("--adam-epsilon", type=float, help="Adam epsilon (default: pretrain's, 1e-8)")
    parser.add_argument(
        "--pretrain-arg", action="append", default=[], metavar="ARG",
        help="extra argument passed to `byola-keras pretrain` (repeatable, e.g. --pretrain-arg=--workers=2)",
    )
    parser.add_argument("--skip-pretrain", action="store_true", help="only evaluate existing outputs")
    return linear_eval.add_task_arguments(parser)


def main(argv=None):
    parser = build_parser()
    args = linear_eval.finish_task_arguments(parser.parse_args(argv))
    if args.epochs is None:
        args.epochs = 1 if args.quick else 20
    if args.batch_size is None:
        args.batch_size = 16 if args.quick else 256
    if args.steps_per_epoch is None and args.quick:
        args.steps_per_epoch = 2
    names = list(VARIANTS)
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            parser.error(f"Unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}.")
    audio_dir = args.audio_dir
    if audio_dir is None and os.path.isdir(os.path.join(args.tasks_dir, "pool")):
        audio_dir = os.path.join(args.tasks_dir, "pool")
    if audio_dir is not None and not os.path.isdir(audio_dir):
        parser.error(f"--audio-dir {audio_dir}: not a folder.")
    args.out = os.path.abspath(args.out)
    _common.setup_backend(args.backend)
    if audio_dir and args.quick:
        audio_dir = quick_audio_dir(audio_dir, args.out)

    from byola_keras.evaluation import load_encoder

    manifests = linear_eval.prepare_manifests(args)
    tasks = list(manifests)
    outputs = {}
    for name in names:
        if args.skip_pretrain:
            outputs[name] = (os.path.join(args.out, _slug(name)), None)
        else:
            outputs[name] = pretrain_variant(name, VARIANTS[name], args, audio_dir)
    results = {}
    for name in names:
        folder, seconds = outputs[name]
        encoder = load_encoder(folder)  # a WaveformEncoder: its own statistics and front-end
        results[name] = linear_eval.evaluate_encoder(name, encoder, manifests, args)
        results[name].update(
            encoder_path=folder,
            switches=VARIANTS[name],
            pretrain_seconds=seconds,
        )
    table = linear_eval.results_table(results, tasks, markdown=args.markdown)
    print(f"\nAblation, {args.epochs} epoch(s) x batch {args.batch_size}"
          + (f" x {args.steps_per_epoch} steps" if args.steps_per_epoch else "")
          + f", d={args.dim}, alpha={args.alpha}; test accuracy (%)")
    print(table)
    out = args.json or _common.default_json_path("ablation", args.backend)
    config = {k: v for k, v in vars(args).items() if k != "json"}
    config["audio_dir"] = audio_dir
    _common.write_json(out, {"benchmark": "ablation", "config": config, "tasks": tasks,
                             "variants": {n: variant_config(VARIANTS[n], args) for n in names},
                             "table": table, "results": results})
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
