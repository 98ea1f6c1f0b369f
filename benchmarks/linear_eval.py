#!/usr/bin/env python
"""Linear evaluation of several representations on the generated downstream tasks.

Compares, in one table (test accuracy % per task and the average):
  - plain log-mel: mean and std of each mel bin over time (128-d),
  - a randomly initialised AudioNTT2020 (d=512 unless --dim; PyTorch's
    initialisation as the official networks, or --init keras),
  - encoders pretrained by `byola-keras pretrain` (--pretrained [LABEL=]DIR,
    DIR holding encoder.keras; repeat for several budgets),
  - the official weights (--official AudioNTT2020-BYOLA-64x96d512.pth),
each through the papers' linear probe and/or a logistic regression
(`byola_keras.evaluation`). Statistics: the model's for pretrained
encoders, each task's train split otherwise. Embeddings are cached, so a
re-run with more encoders only embeds the new ones.

    python benchmarks/linear_eval.py --pretrained b100=runs/b100 --pretrained b400=runs/b400 \
        --official ../shared/reference/weights/AudioNTT2020-BYOLA-64x96d512.pth
    python benchmarks/linear_eval.py --quick          # smoke run: 2 tasks, few clips, 1 run

Tasks come from `make_tasks.sh` (default ~/.cache/byola-tasks/dev: one
manifest_<task>.csv each). Results: a table on stdout and JSON
(default benchmarks/results/linear_eval-BACKEND.json).
"""

import argparse
import csv
import glob
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

DEFAULT_TASKS_DIR = os.path.join(os.path.expanduser("~"), ".cache", "byola-tasks", "dev")
QUICK_TASKS = ("words", "events")
QUICK_MAX_CLIPS = 60


def add_task_arguments(parser):
    """Task selection and probe settings, shared with ablation.py."""
    parser.add_argument("--tasks-dir", default=DEFAULT_TASKS_DIR, help="folder of manifest_<task>.csv files")
    parser.add_argument("--tasks", help="comma-separated task names (default: all; --quick: words,events)")
    parser.add_argument(
        "--max-clips", type=int, help="at most N clips per split and task (evenly spaced; --quick: 60)"
    )
    parser.add_argument("--probe", choices=("linear", "logreg", "both"), default="both")
    parser.add_argument("--runs", type=int, help="linear-probe runs (default 5; --quick: 1)")
    parser.add_argument(
        "--patience", type=int, default=None,
        help="early stopping (default: the encoder's version's, 10 in v1, 20 in v2)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--duration", help="crop/zero-pad clips to S seconds, or 'mean' (default: whole clips)"
    )
    parser.add_argument("--cache-dir", help="embedding cache (default ~/.cache/byola-keras/embeddings)")
    parser.add_argument("--json", help="output JSON file")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    _common.add_backend_argument(parser)
    return parser


def finish_task_arguments(args):
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if args.max_clips is None and args.quick:
        args.max_clips = QUICK_MAX_CLIPS
    if args.duration not in (None, "mean"):
        args.duration = float(args.duration)
    return args


def select_manifests(tasks_dir, tasks=None, quick=False):
    """`{task: manifest path}` of the chosen tasks, in a stable order."""
    found = {}
    for path in sorted(glob.glob(os.path.join(tasks_dir, "manifest_*.csv"))):
        found[os.path.basename(path)[len("manifest_") : -len(".csv")]] = path
    if not found:
        raise SystemExit(
            f"No manifest_<task>.csv in '{tasks_dir}'. Generate the tasks with "
            "../shared/data/make_tasks.sh or pass --tasks-dir."
        )
    if tasks:
        wanted = [t.strip() for t in tasks.split(",") if t.strip()]
    elif quick:
        wanted = [t for t in QUICK_TASKS if t in found] or list(found)[:2]
    else:
        wanted = list(found)
    unknown = [t for t in wanted if t not in found]
    if unknown:
        raise SystemExit(f"Unknown task(s) {unknown} in '{tasks_dir}'; available: {', '.join(found)}.")
    return {t: found[t] for t in wanted}


def subsample_manifests(manifests, max_clips, folder):
    """Copies of the manifests keeping at most `max_clips` evenly spaced rows per split.

    Paths become absolute, so the copies live anywhere (`folder`).
    """
    out = {}
    for task, path in manifests.items():
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames
            rows = list(reader)
        root = os.path.dirname(os.path.abspath(path))
        kept = []
        for split in ("train", "valid", "test"):
            members = [r for r in rows if r["split"] == split]
            if len(members) > max_clips:
                step = len(members) / max_clips
                members = [members[int(i * step)] for i in range(max_clips)]
            kept.extend(members)
        for row in kept:
            row["path"] = os.path.normpath(os.path.join(root, row["path"]))
        copy = os.path.join(folder, f"manifest_{task}.csv")
        with open(copy, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        out[task] = copy
    return out


def prepare_manifests(args):
    """The chosen manifests; with --max-clips, subsampled copies in a stable folder
    (next to the embedding cache, so that re-runs hit the cache)."""
    manifests = select_manifests(args.tasks_dir, args.tasks, args.quick)
    if args.max_clips:
        from byola_keras.evaluation import default_cache_dir

        root = os.path.abspath(args.tasks_dir)
        tag = f"{os.path.basename(root)}-{hashlib.sha1(root.encode()).hexdigest()[:8]}-max{args.max_clips}"
        cache_dir = os.path.abspath(args.cache_dir) if args.cache_dir else default_cache_dir()
        base = os.path.dirname(cache_dir)
        folder = os.path.join(base, "task-subsets", tag)
        os.makedirs(folder, exist_ok=True)
        manifests = subsample_manifests(manifests, args.max_clips, folder)
    return manifests


def evaluate_encoder(label, encoder, manifests, args, mean=None, std=None, htk=False):
    """`byola_keras.evaluation.evaluate` with the script's settings; prints progress."""
    from byola_keras.evaluation import evaluate

    print(f"\n== {label}", flush=True)
    with _common.Timer() as timer:
        result = evaluate(
            encoder,
            list(manifests.values()),
            mean=mean,
            std=std,
            runs=args.runs,
            probe=args.probe,
            cache_dir=args.cache_dir,
            duration=args.duration,
            seed=args.seed,
            htk=htk,
            patience=args.patience,
            verbose=True,
        )
    result["seconds"] = timer.seconds
    return result


def results_table(results, tasks, markdown=False):
    """One row per (encoder, probe): accuracy % per task, then the average."""
    headers = ["representation", *tasks, "avg"]
    rows = []
    for label, result in results.items():
        for probe in ("linear", "logreg"):
            if probe not in result["average"]:
                continue
            row = [f"{label} [{probe}]"]
            for task in tasks:
                entry = result["tasks"].get(task, {}).get(probe)
                row.append(None if entry is None else _common.percent(entry["mean"]))
            row.append(_common.percent(result["average"][probe]))
            rows.append(row)
    return _common.format_table(headers, rows, markdown=markdown)


def build_parser():
    parser = argparse.ArgumentParser(
        description="Linear evaluation of log-mel, random, pretrained and official encoders.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--pretrained",
        action="append",
        default=[],
        metavar="[LABEL=]DIR",
        help="a `byola-keras pretrain` output folder (encoder.keras); repeatable",
    )
    parser.add_argument("--official", metavar="PATH", help="official AudioNTT2020 .pth weights")
    parser.add_argument("--dim", type=int, default=512, help="embedding size of the random encoder")
    parser.add_argument(
        "--init", choices=("torch", "keras"), default="torch",
        help="initialisation of the random encoder: PyTorch's (the official random encoder) or Keras's",
    )
    parser.add_argument("--no-random", action="store_true", help="skip the random encoder")
    parser.add_argument("--no-logmel", action="store_true", help="skip the log-mel baseline")
    return add_task_arguments(parser)


def main(argv=None):
    parser = build_parser()
    args = finish_task_arguments(parser.parse_args(argv))
    pretrained = [_common.parse_labelled(spec) for spec in args.pretrained]
    for label, path in pretrained:
        if not os.path.isdir(path) and not path.endswith(".keras"):
            parser.error(f"--pretrained {label}={path}: not a folder (or .keras file).")
    if args.official and not os.path.isfile(args.official):
        parser.error(f"--official {args.official}: no such file.")
    _common.setup_backend(args.backend, as_program=argv is None)

    import keras

    from byola_keras.evaluation import load_encoder, log_mel_mean_std_encoder
    from byola_keras.models import AudioNTT2020

    manifests = prepare_manifests(args)
    tasks = list(manifests)
    print(f"Tasks: {', '.join(tasks)} ({args.tasks_dir}); backend {args.backend}", flush=True)
    results = {}
    if not args.no_logmel:
        results["log-mel mean+std"] = evaluate_encoder(
            "log-mel mean+std", log_mel_mean_std_encoder(), manifests, args
        )
    if not args.no_random:
        from byola_keras import seeding  # keras.utils' would import TensorFlow on every backend

        seeding.set_random_seed(args.seed)
        label = f"random AudioNTT2020 d{args.dim} ({args.init} init)"
        encoder = AudioNTT2020(d=args.dim, init=args.init)
        results[label] = evaluate_encoder(label, encoder, manifests, args)
    for label, path in pretrained:
        encoder = load_encoder(path)  # a WaveformEncoder: its own statistics and front-end
        results[label] = evaluate_encoder(label, encoder, manifests, args)
        results[label]["encoder_path"] = os.path.abspath(path)
    if args.official:
        encoder = load_encoder(args.official)
        label = f"official d{encoder.output.shape[-1]}"
        results[label] = evaluate_encoder(label, encoder, manifests, args)
        results[label]["encoder_path"] = os.path.abspath(args.official)
    if not results:
        parser.error("Nothing to evaluate (all encoders skipped).")

    table = results_table(results, tasks, markdown=args.markdown)
    print("\nTest accuracy (%), " + ("linear probe: mean over %d run(s)" % args.runs))
    print(table)
    out = args.json or _common.default_json_path("linear_eval", args.backend)
    config = {k: v for k, v in vars(args).items() if k not in ("json",)}
    _common.write_json(out, {"benchmark": "linear_eval", "config": config, "tasks": tasks,
                             "table": table, "results": results})
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
