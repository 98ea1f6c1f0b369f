"""End to end from audio files: the data pipeline alone vs. the training step.

    python benchmarks/bench_pipeline.py --backend jax [AUDIO_DIR] [--batch 64]
        [--case v1-2048] [--workers 1] [--steps 12] [--warmup 3] [--out JSON] [--quick]

1. Decodes the audio folder (default: the built-in synthetic corpus,
   `byola_keras.data.make_default_corpus()`) into a `LogMelCache` (timed once;
   a second run reuses the cache).
2. Pipeline alone: batches/s of `SegmentDataset[i]` (random 96-frame segments
   read from the cache), read the way `fit()` reads them.
3. Model: `fit()` on that `SegmentDataset` (pipeline + step, per-batch times
   from a callback, as in `bench_train_step.py`) and on fixed in-memory batches
   (step alone).
Says which of the two is the bottleneck.
"""

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench  # noqa: E402
import bench_train_step  # noqa: E402


def build_parser():
    p = _bench.parser(__doc__.splitlines()[0])
    p.add_argument("audio_dir", nargs="?", help="Folder of audio files (default: built-in corpus).")
    p.add_argument("--case", choices=sorted(bench_train_step.CASES), default="v1-2048")
    p.add_argument("--cache-dir", dest="cache_dir", help="Log-mel cache (default: a temporary folder).")
    p.add_argument("--workers", type=int, default=1, help="PyDataset workers (threads) for fit().")
    p.add_argument("--pipeline-batches", dest="pipeline_batches", type=int, default=50)
    return p


def main(argv=None):
    p = build_parser()
    args = _bench.parse_args(p, argv, steps=12, warmup=3, quick_steps=10, quick_warmup=2)
    batch = (args.batch or [64])[0]
    import keras

    from byola_keras import data

    audio_dir = args.audio_dir or data.make_default_corpus()
    files = data.find_audio_files(audio_dir)
    cache_dir = args.cache_dir or os.path.join(tempfile.gettempdir(), f"byola-bench-cache-{os.getpid()}")
    started = time.perf_counter()
    cache = data.LogMelCache.build(files, cache_dir, progress=False)
    cache_seconds = time.perf_counter() - started
    print(f"cache: {len(cache)} clips from {audio_dir} in {cache_seconds:.1f} s", flush=True)

    # 2. the pipeline alone
    n = max(args.pipeline_batches, 10)
    dataset = data.SegmentDataset(cache, batch_size=batch, steps_per_epoch=n + 2)
    dataset.on_epoch_end()
    pipeline_times, pipeline_cpu = _bench.time_calls_indexed(dataset.__getitem__, n, warmup=2)
    pipeline = _bench.summarize(pipeline_times, 1, unit="batches", cpu_step_seconds=pipeline_cpu)
    pipeline["samples_per_s_median"] = round(pipeline["batches_per_s_median"] * batch, 1)

    # 3. the model, fed by the pipeline and by fixed batches
    version, dim = bench_train_step.CASES[args.case]
    steps = args.warmup + args.steps
    keras.utils.set_random_seed(0)
    model = bench_train_step.make_learner(version, dim)
    fed = data.SegmentDataset(cache, batch_size=batch, steps_per_epoch=steps, workers=args.workers)
    timer = _bench.fit_step_timer()
    model.fit(fed, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
    end_to_end = _bench.summarize(
        timer.step_seconds(args.warmup), batch, cpu_step_seconds=timer.cpu_step_seconds(args.warmup)
    )
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = bench_train_step.make_learner(version, dim)
    times, cpu, _, _, _ = bench_train_step.time_fit(model, batch, args.steps, args.warmup)
    step_only = _bench.summarize(times, batch, cpu_step_seconds=cpu)

    pipeline_ms = 1000.0 / pipeline["batches_per_s_median"]
    bottleneck = "pipeline" if pipeline_ms > step_only["step_ms_median"] else "model step"
    rows = [
        {"stage": "log-mel cache build (once)", "seconds": round(cache_seconds, 1), "clips": len(cache)},
        {"stage": "pipeline alone (SegmentDataset)", "samples_per_s_median": pipeline["samples_per_s_median"],
         "ms_per_batch": round(pipeline_ms, 2)},
        {"stage": f"fit() on SegmentDataset ({args.case})", "samples_per_s_median": end_to_end["samples_per_s_median"],
         "ms_per_batch": end_to_end["step_ms_median"]},
        {"stage": f"fit() on in-memory batches ({args.case})", "samples_per_s_median": step_only["samples_per_s_median"],
         "ms_per_batch": step_only["step_ms_median"]},
    ]
    for row in rows:
        row["backend"] = args.backend
    _bench.print_table(
        rows,
        [("backend", "backend"), ("stage", "stage"), ("samples_per_s_median", "samples/s"),
         ("ms_per_batch", "ms/batch"), ("seconds", "s")],
    )
    share = 100.0 * pipeline_ms / step_only["step_ms_median"]
    print(f"Bottleneck: the {bottleneck} (the pipeline needs {pipeline_ms:.1f} ms per batch of {batch}, "
          f"{share:.1f}% of a {step_only['step_ms_median']:.0f} ms step).")
    if not args.cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    out = args.out or _bench.default_out("pipeline", args.backend)
    _bench.write_json(out, _bench.record(
        "pipeline", args, rows, batch=batch, case=args.case, audio_dir=audio_dir, files=len(files),
        pipeline=pipeline, end_to_end=end_to_end, step_only=step_only, bottleneck=bottleneck,
    ))
    return rows


if __name__ == "__main__":
    main()
