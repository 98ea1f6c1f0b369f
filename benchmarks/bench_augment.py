"""The BYOL-A augmentation module alone (both views), samples/s.

    python benchmarks/bench_augment.py --backend jax [--versions v1 v2]
        [--batch 64 256] [--steps 30] [--warmup 3] [--jit auto|true|false]
        [--processes 3] [--out JSON] [--quick]

One call = `AugmentationModule(x, training=True)` on a batch `[B, 64, 96, 1]`
producing both views (Pre-Norm, log-mixup-exp with a full 2,048-entry memory
bank, Random Resize Crop, v2's Random Linear Fader, Post-Norm), compiled the
way a training step compiles it:
- JAX: `jax.jit` of `stateless_call`, the layer state (memory bank, seeds)
  threaded through and donated, as `fit()` does;
- TensorFlow: `tf.function(jit_compile=True)` (XLA) by default, `--jit false`
  for graph mode without XLA;
- PyTorch: eager under `torch.no_grad()`.
Every call ends with a host sync (`block_until_ready` / `.numpy()`).

The cases run in `--processes` fresh processes (3 by default) and the table
gives the median of their medians: on some CPUs a compiled JAX call keeps one
of two speeds for the whole process, depending on where its buffers lie
(`benchmarks/NOTES.md`), so one process measures only the mode it drew.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench  # noqa: E402


def build_parser():
    p = _bench.parser(__doc__.splitlines()[0])
    p.add_argument("--versions", nargs="+", choices=("v1", "v2"), default=["v1", "v2"])
    p.add_argument("--jit", choices=("auto", "true", "false"), default="auto",
                   help="TensorFlow: XLA (auto/true) or plain graph (false); torch: "
                        "'true' tries torch.compile.")
    p.add_argument("--processes", type=int, default=None,
                   help="Fresh processes to run the cases in; the table gives the median of "
                        "their medians (default 3, 1 with --quick).")
    return p


def make_step(aug, x, jit):
    """A zero-argument function running one augmentation call and syncing."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        trainable = [v.value for v in aug.trainable_variables]
        state = {"nt": [v.value for v in aug.non_trainable_variables]}

        def pure(non_trainable, x):
            (v1, v2), non_trainable = aug.stateless_call(trainable, non_trainable, x, training=True)
            return v1, v2, non_trainable

        fn = jax.jit(pure, donate_argnums=(0,))
        xd = jax.device_put(x)

        def step():
            v1, v2, state["nt"] = fn(state["nt"], xd)
            jax.block_until_ready((v1, v2))

        return step
    if backend == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda x: aug(x, training=True), jit_compile=(jit != "false"))
        xt = tf.constant(x)

        def step():
            v1, v2 = fn(xt)
            v1.numpy()
            v2.numpy()

        return step
    import torch

    xt = keras.ops.convert_to_tensor(x)  # on Keras's default device
    call = (lambda x: aug(x, training=True))
    if jit == "true":
        call = torch.compile(call)

    def step():
        with torch.no_grad():
            v1, v2 = call(xt)
        _bench.sync(v1)

    return step


def run_case(version, batch, args):
    import keras
    import numpy as np

    from byola_keras.layers import AugmentationModule

    keras.backend.clear_session()
    aug = AugmentationModule(version=version, mean=-5.5, std=5.0, seed=0)
    aug.build((None, 64, 96, 1))
    rng = np.random.default_rng(0)
    # Fill the memory bank first so that mixup runs as in steady-state training.
    bank = rng.normal(-5.5, 5.0, (aug.memory_size, 64, 96, 1)).astype("float32")
    for start in range(0, aug.memory_size, 256):
        aug(bank[start : start + 256], training=True)
    x = rng.normal(-5.5, 5.0, (batch, 64, 96, 1)).astype("float32")
    step = make_step(aug, x, args.jit)
    times, cpu = _bench.time_calls(step, args.steps, args.warmup)
    row = {
        "version": version,
        "batch": batch,
        "input_shape": [batch, 64, 96, 1],
        "views": 2,
        **_bench.summarize(times, batch, cpu_step_seconds=cpu),
    }
    return row


def across_processes(args, argv):
    """Run this script with `argv` in `args.processes` fresh processes; one
    row per case with the median of the processes' medians."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.processes):
            out = os.path.join(tmp, f"process{k}.json")
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--processes", "1", "--out", out]
            subprocess.run(cmd, check=True)
            with open(out) as f:
                runs.append(json.load(f))
    rows = []
    for i, first in enumerate(runs[0]["results"]):
        per = [run["results"][i] for run in runs]
        row = dict(first)
        for key in ("samples_per_s_median", "step_ms_median", "cpu_s_per_step_median",
                    "cpu_bound_samples_per_s", "parallelism"):
            if key in first:
                row[key] = round(statistics.median(r[key] for r in per), 4)
        row["samples_per_s_min"] = min(r["samples_per_s_min"] for r in per)
        row["samples_per_s_max"] = max(r["samples_per_s_max"] for r in per)
        row["timed_steps"] = sum(r["timed_steps"] for r in per)
        row["processes"] = len(per)
        row["process_samples_per_s_median"] = [r["samples_per_s_median"] for r in per]
        row["process_step_ms_median"] = [r["step_ms_median"] for r in per]
        rows.append(row)
    record = dict(runs[0])
    record["results"] = rows
    record["processes"] = len(runs)
    record["memory"] = max((run["memory"] for run in runs), key=lambda m: m["peak_rss_mib"])
    return rows, record


def main(argv=None):
    p = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _bench.parse_args(p, argv, steps=30, warmup=3, quick_steps=10, quick_warmup=2)
    if args.processes is None:
        args.processes = 1 if args.quick else 3
    if args.processes < 1:
        p.error("--processes must be >= 1")
    if args.processes > 1:
        rows, record = across_processes(args, argv)
    else:
        rows, record = run_cases(args), None
    _bench.print_table(
        rows,
        [
            ("backend", "backend"),
            ("version", "version"),
            ("batch", "batch"),
            ("samples_per_s_median", "samples/s (median)"),
            ("samples_per_s_min", "min"),
            ("samples_per_s_max", "max"),
            ("step_ms_median", "ms/call"),
            ("cpu_bound_samples_per_s", "CPU-bound est."),
            ("process_step_ms_median", "ms/call per process"),
        ],
    )
    out = args.out or _bench.default_out("augment", args.backend)
    if record is None:
        record = _bench.record("augment", args, rows, jit=args.jit, processes=1)
    _bench.write_json(out, record)
    return rows


def run_cases(args):
    batches = args.batch or ([64] if args.quick else [64, 256])
    versions = args.versions[:1] if args.quick else args.versions
    rows = []
    for version in versions:
        for batch in batches:
            row = run_case(version, batch, args)
            row["backend"] = args.backend
            rows.append(row)
            print(f"[{args.backend}] {version} batch {batch}: {row['samples_per_s_median']:,.0f} samples/s", flush=True)
    return rows


if __name__ == "__main__":
    main()
