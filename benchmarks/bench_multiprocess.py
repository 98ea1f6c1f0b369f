"""One process against two on this machine: training step time, and the
per-step cost of the stop agreement.

    python benchmarks/bench_multiprocess.py --backend jax [--batch 16] [--dim 64]
        [--steps 8] [--repeats 2] [--calls 200] [--out JSON]

1. Training, the way `byola-keras pretrain` trains (`byola_keras.cluster.Job`:
   the engine, `SegmentDataset` shards, `Job.fit_data`, `fit()` in the job's
   scope) on the built-in corpus's cache: one process, and two local
   processes with the same global batch (Keras's `KERAS_DISTRIBUTION_*`
   variables on JAX, `TF_CONFIG` on TensorFlow, localhost ports), the latter
   with and without the stop agreement after every step (`Job.any`, what
   `preemption.StopAtStep` adds); alternated `--repeats` times. Step time:
   the median time between the ends of two steps of the second epoch (the
   first holds the compilation), on process 0.
2. The stop agreement alone: each of two processes times `Job.any(False)`
   (one all-gather of one integer through the engine's collectives) `--calls`
   times after 20 warm-up calls; the median of process 0.

Both processes share this machine's cores: on a 2-core CPU two processes do
not add compute, so the ratio shows what the collectives cost, not a speed-up.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

sys.path.insert(0, _common.REPO)
from byola_keras import cluster  # noqa: E402  (no Keras import)


def _process_env(backend, index, count, addresses):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=_common.REPO)
    for name in ("TF_CONFIG", "KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                 "KERAS_DISTRIBUTION_PROCESS_ID"):
        env.pop(name, None)
    if count == 1:
        return env
    if backend == "tensorflow":
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
    else:
        env.update(
            KERAS_DISTRIBUTION_JOB_ADDRESSES=",".join(addresses), KERAS_DISTRIBUTION_NUM_PROCESSES=str(count),
            KERAS_DISTRIBUTION_PROCESS_ID=str(index),
        )
    return env


def _launch(argv, backend, count, timeout=3000):
    """Runs `count` copies of `argv`; returns the JSON that process 0 prints last."""
    addresses = cluster.local_addresses(count)
    procs = [
        subprocess.Popen(argv, env=_process_env(backend, i, count, addresses), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for i in range(count)
    ]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"a process exited with {p.returncode}:\n{out}\n{err[-3000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def _job(backend):
    group = cluster.resolve(backend)
    return cluster.Job() if group is None else cluster.start(backend, group)


def _train_worker(args):
    import keras

    from byola_keras import data, pretrain

    backend = keras.backend.backend()
    job = _job(backend)
    cache = data.LogMelCache(args.cache)
    settings = pretrain.resolve_settings(dim=args.dim, batch_size=args.batch, memory_size=args.batch * 4)
    from byola_keras import seeding  # keras.utils' would import TensorFlow on every backend

    seeding.set_random_seed(0)
    shard = (job.process_id, job.num_processes) if job.multi_process else None
    dataset = data.SegmentDataset(cache, batch_size=args.batch, steps_per_epoch=args.steps, shard=shard)
    ends = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # as the non-finite-loss guard does: wait for the step
            if args.agree:
                job.any(False)
            ends.append(time.perf_counter())

    with job.scope():
        model = pretrain.build_learner(settings, *data.compute_norm_stats(cache))
        fed, steps = job.fit_data(dataset, 0, 2, 0)
        model.fit(fed, epochs=2, steps_per_epoch=steps, callbacks=[Timer()], verbose=0, shuffle=False)
    second = ends[args.steps - 1 :]
    print(json.dumps({"step_s": statistics.median(b - a for a, b in zip(second, second[1:]))}))


def _agree_worker(args):
    job = _job(args.backend)
    for _ in range(20):
        job.any(False)
    samples = []
    for _ in range(args.calls):
        started = time.perf_counter()
        job.any(False)
        samples.append(time.perf_counter() - started)
    samples.sort()
    print(json.dumps({"median_ms": 1e3 * statistics.median(samples), "p90_ms": 1e3 * samples[int(0.9 * len(samples))]}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_backend_argument(parser)
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="steps per epoch (2 epochs)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", default=os.path.join(_common.RESULTS_DIR, "multiprocess.json"))
    parser.add_argument("--worker", choices=("train", "agree"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--agree", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _common.setup_backend(args.backend)
    sys.path.insert(0, _common.REPO)
    if args.worker == "train":
        return _train_worker(args)
    if args.worker == "agree":
        return _agree_worker(args)

    from byola_keras import data

    folder = tempfile.mkdtemp(prefix="bench-multiprocess-")
    try:
        corpus = data.make_default_corpus(os.path.join(folder, "corpus"), num_clips=max(64, args.batch * args.steps))
        cache = os.path.join(folder, "cache")
        data.LogMelCache.build(data.find_audio_files(corpus), cache, progress=False)
        train = [sys.executable, os.path.abspath(__file__), "--backend", args.backend, "--worker", "train",
                 "--cache", cache, "--batch", str(args.batch), "--dim", str(args.dim), "--steps", str(args.steps)]
        cases = (("1 process", 1, 1), ("2 processes", 2, 1), ("2 processes, no agreement", 2, 0))
        results = {name: [] for name, _, _ in cases}
        for _ in range(args.repeats):
            for name, count, agree in cases:
                results[name].append(_launch([*train, "--agree", str(agree)], args.backend, count)["step_s"])
        agreement = _launch([sys.executable, os.path.abspath(__file__), "--backend", args.backend, "--worker",
                             "agree", "--calls", str(args.calls)], args.backend, 2)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows = [
        [name, " ".join(f"{1e3 * s:.0f}" for s in steps), f"{args.batch / statistics.median(steps):.1f}"]
        for name, steps in results.items()
    ]
    print(f"{args.backend}, v1 d={args.dim}, global batch {args.batch}")
    print(_common.format_table(["run", "ms/step (each repeat)", "samples/s (median)"], rows))
    print(f"stop agreement alone (one all-gather of one int, 2 processes): median {agreement['median_ms']:.2f} ms, "
          f"p90 {agreement['p90_ms']:.2f} ms")
    _common.write_json(args.out, {
        "backend": args.backend, "batch": args.batch, "dim": args.dim, "steps": args.steps,
        "step_seconds": results, "agreement_ms": agreement,
    })


if __name__ == "__main__":
    main()
