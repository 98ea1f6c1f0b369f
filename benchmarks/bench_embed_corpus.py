"""Embedding a corpus of files: `byola-keras embed` against a Python loop over `encoder.embed`, files/s.

    python benchmarks/bench_embed_corpus.py [--backends jax tensorflow torch] [--files 200]
        [--rounds 2] [--dim 2048] [--batch-size 32] [--workers N] [--corpus DIR] [--out JSON] [--quick]

The corpus (made once under `--corpus`, default `~/.cache/byola-keras/bench-embed-corpus-N`):
`--files` real audio files written with soundfile from the built-in synthetic
corpus (`byola_keras.data.make_default_corpus`), of random lengths (0.5 to
10 s), sample rates (8 to 48 kHz), channel counts (1 or 2) and formats (WAV
16-bit, FLAC), and one `encoder.keras` (AudioNTT2020, `--dim`, random
weights: speed does not depend on them).

The two sides, on the same files, each in a fresh process, each timed from
after the model is loaded to the last file (decoding, resampling, compiling,
the encoder, and for `embed` writing the Parquet parts):

- `embed`: `byola_keras.corpus.run.embed_corpus` (what `byola-keras embed`
  runs): decoding threads, length buckets, batches of `--batch-size`.
- `loop`: for each file, `soundfile.read` then `model.embed(wave, sample_rate)`.

Each round runs both sides of a backend one after the other, the order
alternating from round to round (the machine may be shared: pairs, not
separate sessions, are compared). Prints a table and writes JSON
(`benchmarks/results/embed-corpus.json`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

RATES = (8000, 16000, 22050, 32000, 44100, 48000)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", choices=_common.BACKENDS, default=list(_common.BACKENDS))
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2, help="Pairs (embed, loop) per backend.")
    p.add_argument("--dim", type=int, default=2048, help="AudioNTT2020 embedding size.")
    p.add_argument("--batch-size", type=int, default=32, help="`embed` clips per encoder call.")
    p.add_argument("--workers", type=int, default=None, help="`embed` decoding threads (default: its own).")
    p.add_argument("--corpus", default=None, help="Folder of the corpus (made if missing).")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/embed-corpus.json).")
    p.add_argument("--quick", action="store_true", help="24 files, d=256, one round: a smoke test.")
    p.add_argument("--worker", choices=("make", "embed", "loop"), help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------
# Workers (one process each)


def make_corpus(folder, files, dim, seed=0):
    """Writes the benchmark's audio files and encoder into `folder` (once)."""
    import numpy as np
    import soundfile as sf

    marker = os.path.join(folder, "corpus.json")
    if os.path.exists(marker):
        return
    import keras

    from byola_keras.data import make_default_corpus
    from byola_keras.models import AudioNTT2020, WaveformEncoder

    source = make_default_corpus(os.path.join(folder, "source"), num_clips=48, seed=seed)
    clips = []
    for name in sorted(os.listdir(source)):
        sub = os.path.join(source, name)
        if os.path.isdir(sub):
            clips += [sf.read(os.path.join(sub, f), dtype="float32")[0] for f in sorted(os.listdir(sub))]
    material = np.concatenate(clips)
    rng = np.random.default_rng(seed)
    audio = os.path.join(folder, "audio")
    os.makedirs(audio, exist_ok=True)
    listing = []
    for i in range(files):
        seconds = float(rng.uniform(0.5, 10.0))
        rate = int(rng.choice(RATES))
        channels = 2 if rng.random() < 0.3 else 1
        count = int(seconds * rate)
        start = int(rng.integers(0, material.shape[0] - count))
        wave = material[start : start + count]
        if channels == 2:
            wave = np.stack([wave, 0.8 * np.roll(wave, 7)], axis=1)
        name = f"clip{i:04d}." + ("flac" if rng.random() < 0.5 else "wav")
        sf.write(os.path.join(audio, name), wave, rate, subtype="PCM_16")
        listing.append({"file": name, "seconds": round(seconds, 3), "rate": rate, "channels": channels})
    from byola_keras import seeding  # keras.utils' would import TensorFlow on every backend

    seeding.set_random_seed(seed)
    WaveformEncoder(AudioNTT2020(d=dim), -5.49, 5.04).save(os.path.join(folder, "encoder.keras"))
    with open(marker, "w") as f:
        json.dump({"files": listing, "dim": dim, "seed": seed}, f, indent=1)


def run_side(side, folder, batch_size, workers):
    """Times one side in this process; prints one JSON line."""
    import resource
    import shutil
    import tempfile

    import keras
    import soundfile as sf

    import byola_keras  # noqa: F401  (registers the classes)
    from byola_keras.corpus.run import embed_corpus

    model = keras.saving.load_model(os.path.join(folder, "encoder.keras"))
    audio = os.path.join(folder, "audio")
    files = sorted(os.listdir(audio))
    cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    start = time.perf_counter()
    if side == "embed":
        out = tempfile.mkdtemp(prefix="bench-embed-")
        try:
            summary = embed_corpus(model, audio, out, batch_size=batch_size, workers=workers, quiet=True)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        done = summary.embedded
    else:
        done = 0
        for name in files:
            wave, rate = sf.read(os.path.join(audio, name), dtype="float32", always_2d=True)
            model.embed([wave], sample_rate=rate)
            done += 1
    seconds = time.perf_counter() - start
    cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({
        "side": side, "backend": keras.backend.backend(), "files": len(files), "embedded": done,
        "seconds": round(seconds, 3), "files_per_s": round(done / seconds, 3), "cpu_seconds": round(cpu, 2),
        "peak_rss_mib": round(rss, 1), "load_average": [round(x, 2) for x in os.getloadavg()],
    }))


# ----------------------------------------------------------------------------
# The driver


def _worker(args, backend, side, extra=()):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([_common.REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--corpus", args.corpus,
           "--dim", str(args.dim), "--files", str(args.files), "--batch-size", str(args.batch_size), *extra]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} on {backend} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) if side != "make" else None


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.quick:
        args.files, args.dim, args.rounds = 24, 256, 1
    if args.worker:
        if args.worker == "make":
            return make_corpus(args.corpus, args.files, args.dim)
        return run_side(args.worker, args.corpus, args.batch_size, args.workers)
    if args.corpus is None:
        cache = os.environ.get("BYOLA_KERAS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "byola-keras")
        args.corpus = os.path.join(cache, f"bench-embed-corpus-{args.files}-d{args.dim}")
    args.corpus = os.path.abspath(args.corpus)
    _worker(args, args.backends[0], "make")
    with open(os.path.join(args.corpus, "corpus.json")) as f:
        listing = json.load(f)["files"]
    rows = []
    for backend in args.backends:
        for r in range(args.rounds):
            order = ("embed", "loop") if r % 2 == 0 else ("loop", "embed")
            pair = {side: _worker(args, backend, side) for side in order}
            ratio = pair["embed"]["files_per_s"] / pair["loop"]["files_per_s"]
            rows.append({"backend": backend, "round": r, "order": "/".join(order),
                         "embed": pair["embed"], "loop": pair["loop"], "ratio": round(ratio, 2)})
            print(f"[{backend}] round {r} ({'/'.join(order)}): embed {pair['embed']['files_per_s']:.2f} "
                  f"files/s, loop {pair['loop']['files_per_s']:.2f} files/s, {ratio:.2f}x", flush=True)
    table = []
    for backend in args.backends:
        mine = [r for r in rows if r["backend"] == backend]
        table.append([
            backend, len(mine),
            f"{statistics.median(r['embed']['files_per_s'] for r in mine):.2f}",
            f"{statistics.median(r['loop']['files_per_s'] for r in mine):.2f}",
            f"{statistics.median(r['ratio'] for r in mine):.2f}x",
            f"{statistics.median(r['embed']['peak_rss_mib'] for r in mine):.0f}",
            f"{statistics.median(r['loop']['peak_rss_mib'] for r in mine):.0f}",
        ])
    seconds = sum(item["seconds"] for item in listing)
    print(f"\n{len(listing)} files, {seconds / 60:.1f} min of audio, AudioNTT2020 d={args.dim}, "
          f"embed --batch-size {args.batch_size}")
    _common.print_table(
        ["backend", "pairs", "embed files/s", "loop files/s", "embed / loop", "embed RSS MiB", "loop RSS MiB"], table
    )
    out = args.out or _common.default_json_path("embed-corpus")
    _common.write_json(out, {
        "benchmark": "embed-corpus", "files": len(listing), "audio_seconds": round(seconds, 1),
        "dim": args.dim, "batch_size": args.batch_size, "workers": args.workers, "rounds": args.rounds,
        "results": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
