"""Pretraining rate of the command line (`byola-keras pretrain`: cache -> `fit()`), samples/s.

    python benchmarks/bench_cli.py --backend jax [--batch 256] [--dim 512] [--version v1]
        [--steps-per-epoch 100] [--epochs 1 3] [--repeats 2] [AUDIO_DIR]
        [--in-memory benchmarks/results/train_step-jax.json] [--out JSON]

Every run is a whole `byola-keras pretrain` process with its own `--out` and one
shared, prebuilt log-mel cache (`--cache-dir`). Two runs that differ only in
their number of epochs start, import, build and compile alike, so the
difference of their wall times is the time of the extra epochs as a user gets
them: reading segments from the cache, the training steps, the per-step
callbacks and the checkpoint written after every epoch. The rate is

    (epochs_long - epochs_short) * steps_per_epoch * batch / (T_long - T_short)

measured `--repeats` times (short and long runs alternate) and reported as
the median. `--in-memory JSON` (a `bench_train_step.py` result of the same
backend) adds the ratio of this rate to the training step's in-memory rate of
the same case and batch: the share of the step rate the data pipeline and the
command line keep. Without AUDIO_DIR the built-in synthetic corpus is used
(clips repeat within an epoch when `--steps-per-epoch` asks for more batches
than it has clips).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench  # noqa: E402

CASE_NAMES = {("v1", 512): "v1-512", ("v1", 1024): "v1-1024", ("v1", 2048): "v1-2048", ("v2", 3072): "v2"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("audio_dir", nargs="?", default=None, help="Audio folder (default: the built-in corpus).")
    p.add_argument("--backend", choices=_bench.BACKENDS, default=os.environ.get("KERAS_BACKEND", "jax"))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--version", choices=("v1", "v2"), default="v1")
    p.add_argument("--dim", type=int, default=None, help="Encoder width (default: the version's).")
    p.add_argument("--steps-per-epoch", dest="steps_per_epoch", type=int, default=100)
    p.add_argument("--epochs", type=int, nargs=2, default=(1, 3), metavar=("SHORT", "LONG"),
                   help="Epochs of the short and the long run (default 1 3).")
    p.add_argument("--repeats", type=int, default=2, help="Pairs of runs (default 2).")
    p.add_argument("--work", default=None, help="Folder for the runs (default: a temporary folder).")
    p.add_argument("--in-memory", dest="in_memory", default=None,
                   help="bench_train_step.py JSON of the same backend: report the ratio to it.")
    p.add_argument("--out", default=None, help="JSON to write (default benchmarks/results/cli-BACKEND.json).")
    p.add_argument("--quick", action="store_true",
                   help="Small: batch 8, 3 steps per epoch, 1 pair, d=64 unless --dim is given.")
    return p


def _command(args, out, cache_dir, epochs):
    command = [
        sys.executable, "-m", "byola_keras.cli", "pretrain",
        "--backend", args.backend, "--out", out, "--cache-dir", cache_dir,
        "--epochs", str(epochs), "--steps-per-epoch", str(args.steps_per_epoch),
        "--batch-size", str(args.batch), "--version", args.version, "--verbose", "0",
    ]
    if args.dim is not None:
        command += ["--dim", str(args.dim)]
    if args.audio_dir:
        command.insert(4, args.audio_dir)
    return command


def _run(command, log):
    started = time.perf_counter()
    with open(log, "w") as f:
        result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"error: {' '.join(command)} exited {result.returncode}; its output ends:\n{tail}")
    return seconds


def _in_memory_rate(path, case, batch):
    with open(path) as f:
        record = json.load(f)
    for row in record["results"]:
        if row.get("case") == case and row.get("batch") == batch and row.get("batchnorm", "per_view") == "per_view":
            return row["samples_per_s_median"]
    return None


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.quick:
        args.batch, args.steps_per_epoch, args.repeats = 8, 3, 1
        args.dim = args.dim or 64
    short, long_ = args.epochs
    if not 1 <= short < long_:
        raise SystemExit("error: --epochs SHORT LONG needs 1 <= SHORT < LONG")
    if args.repeats < 1 or args.steps_per_epoch < 1 or args.batch < 1:
        raise SystemExit("error: --repeats, --steps-per-epoch and --batch must be >= 1")
    dim = args.dim or {"v1": 2048, "v2": 3072}[args.version]
    case = CASE_NAMES.get((args.version, dim), f"{args.version}-{dim}")
    work = args.work or tempfile.mkdtemp(prefix="byola-bench-cli-")
    os.makedirs(work, exist_ok=True)
    cache_dir = os.path.join(work, "cache")
    # Build the cache (and any on-disk compilation cache) once, untimed.
    _run(_command(args, os.path.join(work, "warm"), cache_dir, 1), os.path.join(work, "warm.log"))
    pairs = []
    for i in range(args.repeats):
        times = {}
        for epochs in (short, long_):
            out = os.path.join(work, f"run-{i}-e{epochs}")
            times[epochs] = _run(_command(args, out, cache_dir, epochs), out + ".log")
        extra = times[long_] - times[short]
        samples = (long_ - short) * args.steps_per_epoch * args.batch
        pairs.append({"short_s": round(times[short], 2), "long_s": round(times[long_], 2),
                      "samples": samples, "samples_per_s": round(samples / extra, 2) if extra > 0 else None})
        print(f"[{args.backend}] pair {i + 1}: {short} epochs {times[short]:.1f} s, {long_} epochs "
              f"{times[long_]:.1f} s -> {pairs[-1]['samples_per_s']} samples/s", flush=True)
    rates = [p["samples_per_s"] for p in pairs if p["samples_per_s"]]
    row = {
        "backend": args.backend,
        "case": case,
        "batch": args.batch,
        "steps_per_epoch": args.steps_per_epoch,
        "epochs": [short, long_],
        "samples_per_s_median": round(statistics.median(rates), 2) if rates else None,
        "startup_s_median": round(statistics.median(
            p["short_s"] - short * p["samples"] / (long_ - short) / p["samples_per_s"] for p in pairs
            if p["samples_per_s"]), 2) if rates else None,
        "pairs": pairs,
        "unit": "samples/s",
    }
    if args.in_memory:
        rate = _in_memory_rate(args.in_memory, case, args.batch)
        row["in_memory_samples_per_s"] = rate
        if rate and row["samples_per_s_median"]:
            row["share_of_in_memory"] = round(row["samples_per_s_median"] / rate, 3)
    _bench.print_table([row], [
        ("backend", "backend"), ("case", "case"), ("batch", "batch"),
        ("samples_per_s_median", "command line samples/s"), ("startup_s_median", "start-up s"),
        ("in_memory_samples_per_s", "in-memory samples/s"), ("share_of_in_memory", "share"),
    ])
    record = {
        "benchmark": "cli",
        "backend": args.backend,
        "quick": args.quick,
        "audio_dir": args.audio_dir or "built-in corpus",
        "results": [row],
        "machine": _bench.machine_info(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _bench.write_json(args.out or _bench.default_out("cli", args.backend), record)
    return row


if __name__ == "__main__":
    main()
