"""End to end from audio files: the data pipeline alone vs. the training step.

    python benchmarks/bench_pipeline.py --backend jax [AUDIO_DIR] [--batch 64]
        [--case v1-2048] [--workers 1] [--steps 12] [--warmup 3] [--out JSON] [--quick]
        [--cache-dir DIR] [--decode-workers N] [--clips-per-shard N] [--data-only]

1. Decodes the audio folder (default: the built-in synthetic corpus,
   `byola_keras.data.make_default_corpus()`) into a `LogMelCache` (timed once;
   after a two-clip warm-up; a second run with the same `--cache-dir` reuses
   the cache, and its clips/s then time only that check): clips/s, shards,
   bytes per clip on disk. Each shard is written with an `fsync`, so for the
   decoding rate use the default shard size.
   `--clips-per-shard 1` makes segment reads hit a different shard each time,
   as in a corpus of millions of clips (AudioSet: about 1,900 shards of the
   default 1,024 clips).
2. Pipeline alone: batches/s of `SegmentDataset[i]` (random 96-frame segments
   read from the cache), read the way `fit()` reads them.
3. Model: `fit()` on that `SegmentDataset` (pipeline + step, per-batch times
   from a callback, as in `bench_train_step.py`) and on fixed in-memory batches
   (step alone).
Says which of the two is the bottleneck. `--data-only` stops after 2.
The "AudioSet h" column scales each rate to AudioSet (1,963,807 clips of 10 s):
hours to build its cache once (1: seconds of audio decoded per second; the
source format and sample rate matter, so measure on files like AudioSet's),
and hours to serve or to train 100 epochs (2, 3).
"""

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench  # noqa: E402
import bench_train_step  # noqa: E402

AUDIOSET_CLIP_SECONDS = 10.0


def build_parser():
    p = _bench.parser(__doc__.splitlines()[0])
    p.add_argument("audio_dir", nargs="?", help="Folder of audio files (default: built-in corpus).")
    p.add_argument("--case", choices=sorted(bench_train_step.CASES), default="v1-2048")
    p.add_argument("--cache-dir", dest="cache_dir", help="Log-mel cache (default: a temporary folder).")
    p.add_argument("--workers", type=int, default=1, help="PyDataset workers (threads) for fit().")
    p.add_argument("--pipeline-batches", dest="pipeline_batches", type=int, default=50)
    p.add_argument("--decode-workers", dest="decode_workers", type=int, default=None,
                   help="Decoding threads for the cache build (default: the library's, min(8, cores)).")
    p.add_argument("--clips-per-shard", dest="clips_per_shard", type=int, default=None,
                   help="Clips per cache shard (default: the library's, 1,024).")
    p.add_argument("--data-only", dest="data_only", action="store_true",
                   help="Measure the cache build and the pipeline alone, not the model.")
    return p


def main(argv=None):
    p = build_parser()
    args = _bench.parse_args(p, argv, steps=12, warmup=3, quick_steps=10, quick_warmup=2)
    batch = (args.batch or [64])[0]
    import keras

    from byola_keras import data, frontend

    audio_dir = args.audio_dir or data.make_default_corpus()
    files = data.find_audio_files(audio_dir)
    cache_dir = args.cache_dir or os.path.join(tempfile.gettempdir(), f"byola-bench-cache-{os.getpid()}")
    build = {"progress": False}
    if args.decode_workers is not None:
        build["workers"] = args.decode_workers
    if args.clips_per_shard is not None:
        build["clips_per_shard"] = args.clips_per_shard
    # Warm-up: a two-clip cache first, so that one-time costs (importing the
    # resampler, the decoders' first calls) stay out of the clips/s. Two broken
    # clips there only cost the warm-up (the build below counts them).
    with tempfile.TemporaryDirectory() as warm:
        try:
            data.LogMelCache.build(files[:2], os.path.join(warm, "cache"), **build)
        except ValueError as err:
            print(f"warm-up skipped: {err}", flush=True)
    started = time.perf_counter()
    cache = data.LogMelCache.build(files, cache_dir, **build)
    cache_seconds = time.perf_counter() - started
    shards = len(cache._shard_files)
    cache_bytes = sum(
        os.path.getsize(os.path.join(cache.cache_dir, name)) for name in os.listdir(cache.cache_dir)
    )
    print(f"cache: {len(cache)} clips from {audio_dir} in {cache_seconds:.1f} s "
          f"({len(cache) / cache_seconds:.1f} clips/s), {shards} shards, "
          f"{cache_bytes / len(cache) / 1024:.0f} KiB per clip", flush=True)
    cache_row = {
        "stage": "log-mel cache build (once)", "seconds": round(cache_seconds, 1), "clips": len(cache),
        "clips_per_s": round(len(cache) / cache_seconds, 1), "shards": shards,
        "kib_per_clip": round(cache_bytes / len(cache) / 1024, 1),
        "frames_per_clip": round(cache.num_frames / len(cache), 1),
    }
    # AudioSet's clips are 10 s long: scale the build rate by audio decoded per second.
    audio_seconds = cache.num_frames * frontend.HOP_LENGTH / frontend.SAMPLE_RATE
    cache_row["audio_s_per_s"] = round(audio_seconds / cache_seconds, 1)
    clips_per_s = audio_seconds / cache_seconds / AUDIOSET_CLIP_SECONDS
    cache_row["audioset_h"] = round(bench_train_step.audioset_hours(clips_per_s, epochs=1), 1)

    # 2. the pipeline alone
    n = max(args.pipeline_batches, 10)
    dataset = data.SegmentDataset(cache, batch_size=batch, steps_per_epoch=n + 2)
    dataset.on_epoch_end()
    pipeline_times, pipeline_cpu = _bench.time_calls_indexed(dataset.__getitem__, n, warmup=2)
    pipeline = _bench.summarize(pipeline_times, 1, unit="batches", cpu_step_seconds=pipeline_cpu)
    pipeline["samples_per_s_median"] = round(pipeline["batches_per_s_median"] * batch, 1)
    pipeline_ms = 1000.0 / pipeline["batches_per_s_median"]
    pipeline_row = {"stage": "pipeline alone (SegmentDataset)", "samples_per_s_median": pipeline["samples_per_s_median"],
                    "ms_per_batch": round(pipeline_ms, 2)}
    if args.data_only:
        return finish(args, [cache_row, pipeline_row], cache_dir, batch=batch, audio_dir=audio_dir,
                      files=len(files), pipeline=pipeline)

    # 3. the model, fed by the pipeline and by fixed batches
    version, dim = bench_train_step.CASES[args.case]
    steps = args.warmup + args.steps
    from byola_keras import seeding  # keras.utils' would import TensorFlow on every backend

    seeding.set_random_seed(0)
    model = bench_train_step.make_learner(version, dim)
    fed = data.SegmentDataset(cache, batch_size=batch, steps_per_epoch=steps, workers=args.workers)
    timer = _bench.fit_step_timer()
    model.fit(fed, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
    end_to_end = _bench.summarize(
        timer.step_seconds(args.warmup), batch, cpu_step_seconds=timer.cpu_step_seconds(args.warmup)
    )
    keras.backend.clear_session()
    seeding.set_random_seed(0)
    model = bench_train_step.make_learner(version, dim)
    times, cpu, _, _, _ = bench_train_step.time_fit(model, batch, args.steps, args.warmup)
    step_only = _bench.summarize(times, batch, cpu_step_seconds=cpu)

    bottleneck = "pipeline" if pipeline_ms > step_only["step_ms_median"] else "model step"
    rows = [
        cache_row,
        pipeline_row,
        {"stage": f"fit() on SegmentDataset ({args.case})", "samples_per_s_median": end_to_end["samples_per_s_median"],
         "ms_per_batch": end_to_end["step_ms_median"]},
        {"stage": f"fit() on in-memory batches ({args.case})", "samples_per_s_median": step_only["samples_per_s_median"],
         "ms_per_batch": step_only["step_ms_median"]},
    ]
    share = 100.0 * pipeline_ms / step_only["step_ms_median"]
    summary = (f"Bottleneck: the {bottleneck} (the pipeline needs {pipeline_ms:.1f} ms per batch of {batch}, "
               f"{share:.1f}% of a {step_only['step_ms_median']:.0f} ms step).")
    return finish(args, rows, cache_dir, summary, batch=batch, case=args.case, audio_dir=audio_dir,
                  files=len(files), pipeline=pipeline, end_to_end=end_to_end, step_only=step_only,
                  bottleneck=bottleneck)


def finish(args, rows, cache_dir, summary=None, **extra):
    """Print the table (and `summary`), remove a temporary cache, write the JSON."""
    for row in rows:
        row["backend"] = args.backend
        if "samples_per_s_median" in row:  # 100 AudioSet epochs at this rate
            row["audioset_h"] = round(bench_train_step.audioset_hours(row["samples_per_s_median"]), 1)
    _bench.print_table(
        rows,
        [("backend", "backend"), ("stage", "stage"), ("samples_per_s_median", "samples/s"),
         ("ms_per_batch", "ms/batch"), ("seconds", "s"), ("clips_per_s", "clips/s"),
         ("shards", "shards"), ("kib_per_clip", "KiB/clip"), ("audio_s_per_s", "audio s/s"),
         ("audioset_h", "AudioSet h")],
    )
    if summary:
        print(summary)
    if not args.cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    out = args.out or _bench.default_out("pipeline", args.backend)
    _bench.write_json(out, _bench.record("pipeline", args, rows, data_only=args.data_only, **extra))
    return rows


if __name__ == "__main__":
    main()
