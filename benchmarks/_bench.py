"""Helpers shared by the byola-keras benchmarks (machine info, timing, JSON, table).

Every benchmark is one process for one backend: `parse_args()` reads
`--backend` and sets `KERAS_BACKEND` before anything imports Keras.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

BACKENDS = _common.BACKENDS
REPO = _common.REPO
RESULTS = _common.RESULTS_DIR


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--backend", choices=BACKENDS, default=os.environ.get("KERAS_BACKEND", "jax"))
    p.add_argument("--batch", type=int, nargs="+", default=None, help="Batch size(s).")
    p.add_argument("--steps", type=int, default=None, help="Timed steps (>= 10).")
    p.add_argument("--warmup", type=int, default=None, help="Untimed steps first (compilation).")
    p.add_argument("--out", default=None, help="JSON file to write (default benchmarks/results/NAME-BACKEND.json).")
    p.add_argument("--quick", action="store_true", help="Few steps, smallest case: a smoke test.")
    p.add_argument("--threads", type=int, default=None, help="Limit intra-op threads (default: all cores).")
    p.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                   help="'reuse' (default): as the command line, byola_keras.reuse_freed_memory(), "
                        "except on JAX where malloc can use transparent huge pages: there the "
                        "process runs again with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 and keeps "
                        "malloc's defaults; 'default': glibc malloc's defaults as started.")
    p.add_argument("--trim-after-compile", dest="trim_after_compile", choices=("on", "off"), default="on",
                   help="'on' (default, as the command line): on JAX, malloc's free memory is given back "
                        "after each compilation (byola_keras.backend.trim_after_compile).")
    p.add_argument("--xla-flags", dest="xla_flags", default="",
                   help="Extra XLA_FLAGS (JAX), e.g. --xla_cpu_copy_insertion_use_region_analysis=true.")
    return p


def parse_args(p, argv=None, steps=20, warmup=3, quick_steps=10, quick_warmup=2):
    """Parse, fill the step defaults and set up the backend environment (before Keras)."""
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = quick_steps if args.quick else steps
    if args.warmup is None:
        args.warmup = quick_warmup if args.quick else warmup
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import byola_keras  # noqa: F401  (before TensorFlow loads: asks for its oneDNN kernels)

    if args.malloc == "reuse":  # as the command line: JAX runs again with malloc on huge pages where possible
        from byola_keras import allocator

        allocator.restart_with_huge_pages(args.backend)
    args.malloc_reuse = args.malloc == "reuse" and _common.reuse_freed_memory(args.backend)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    if args.threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(args.threads)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true"
        ).strip()
    if args.backend == "torch":
        import torch  # noqa: F401  (torch before TensorFlow; see tests/conftest.py)

        if args.threads:
            torch.set_num_threads(args.threads)
    if args.backend == "tensorflow" and args.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, args.threads))
    if args.trim_after_compile == "on":
        from byola_keras.backend import trim_after_compile

        args.trimmed_after_compile = trim_after_compile.install(args.backend)  # after XLA_FLAGS
    return args


def machine_info():
    """`_common.machine_info()` (CPU, cores, load, versions, devices)."""
    return _common.machine_info()


def devices():
    import keras

    return _common._devices(keras.backend.backend())


def peak_memory():
    """Peak resident memory of this process (MiB) and, if any, peak GPU memory (MiB)."""
    import keras

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {"peak_rss_mib": round(rss_kib / 1024.0, 1), "peak_gpu_mib": None}
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            gpus = [d for d in jax.devices() if d.platform == "gpu"]
            if gpus:
                stats = gpus[0].memory_stats() or {}
                out["peak_gpu_mib"] = round(stats.get("peak_bytes_in_use", 0) / 2**20, 1)
        elif backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                out["peak_gpu_mib"] = round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, 1)
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except Exception:
        pass
    return out


def sync(x):
    """Wait until `x` (a tensor or nested structure) is computed."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        jax.block_until_ready(x)
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    else:
        import tensorflow as tf

        for leaf in tf.nest.flatten(x):
            if hasattr(leaf, "numpy"):
                leaf.numpy()
                break
    return x


def cpu_seconds():
    """CPU time (user + system) used so far by this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def summarize(step_seconds, items_per_step, unit="samples", cpu_step_seconds=None):
    """Throughput statistics of per-step wall times (and CPU times, if given).

    `cpu_bound_{unit}_per_s` = items / (CPU seconds per step / usable cores):
    what the step would reach if it had every core to itself and scaled
    perfectly. On a shared, loaded machine it is a steadier figure than the
    wall-clock rate (which then measures the load as much as the code).
    """
    if len(step_seconds) == 0:
        raise ValueError("no timed steps")
    rates = [items_per_step / t for t in step_seconds]
    out = {
        "timed_steps": len(step_seconds),
        "unit": f"{unit}/s",
        f"{unit}_per_s_median": round(statistics.median(rates), 2),
        f"{unit}_per_s_min": round(min(rates), 2),
        f"{unit}_per_s_max": round(max(rates), 2),
        "step_ms_median": round(1000 * statistics.median(step_seconds), 3),
    }
    if cpu_step_seconds:
        cpu = statistics.median(cpu_step_seconds)
        out["cpu_s_per_step_median"] = round(cpu, 4)
        out["parallelism"] = round(cpu / statistics.median(step_seconds), 2)
        out[f"cpu_bound_{unit}_per_s"] = round(items_per_step * usable_cores() / max(cpu, 1e-9), 2)
    return out


def time_calls(fn, steps, warmup):
    """Call `fn()` (which must sync) `warmup` times untimed, then time `steps`
    calls. Returns (wall seconds, CPU seconds) per call."""
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(steps):
        c0 = cpu_seconds()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(cpu_seconds() - c0)
    return times, cpu


def time_calls_indexed(fn, steps, warmup):
    """Like `time_calls` for `fn(i)` with i = 0, 1, ... (e.g. `dataset[i]`)."""
    counter = iter(range(warmup + steps))
    return time_calls(lambda: fn(next(counter)), steps, warmup)


def fit_step_timer():
    """A callback that stamps the end of every training batch (logs are synced to
    Python floats by Keras before user callbacks see them)."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.stamps = []

        def on_train_begin(self, logs=None):
            self.stamps = [time.perf_counter()]
            self.cpu_stamps = [cpu_seconds()]

        def on_train_batch_end(self, batch, logs=None):
            self.stamps.append(time.perf_counter())
            self.cpu_stamps.append(cpu_seconds())

        def step_seconds(self, warmup):
            diffs = [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:])]
            return diffs[warmup:]

        def cpu_step_seconds(self, warmup):
            diffs = [b - a for a, b in zip(self.cpu_stamps[:-1], self.cpu_stamps[1:])]
            return diffs[warmup:]

    return StepTimer()


def default_out(name, backend):
    return os.path.join(RESULTS, f"{name}-{backend}.json")


def write_json(path, record):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)
    print(f"wrote {path}")


def print_table(rows, columns):
    """Print a Markdown table of `rows` (dicts) with `columns` [(key, title)]."""
    titles = [title for _, title in columns]
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in titles) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key)) for key, _ in columns) + " |")
    print("\n".join(lines))


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def record(benchmark, args, results, **extra):
    return {
        "benchmark": benchmark,
        "backend": args.backend,
        "quick": bool(args.quick),
        "warmup": args.warmup,
        "steps": args.steps,
        "threads": args.threads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "malloc_reuse_freed_memory": getattr(args, "malloc_reuse", None),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "trim_after_compile": getattr(args, "trimmed_after_compile", False),
        # TensorFlow's import alone holds about 400 MB; the command line does not import it on JAX or PyTorch.
        "tensorflow_imported": "tensorflow" in sys.modules,
        "results": results,
        "memory": peak_memory(),
        "machine": machine_info(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def summary(paths):
    """One Markdown table of every result JSON in `paths` (the headline figures)."""
    rows = []
    for path in sorted(paths):
        with open(path) as f:
            rec = json.load(f)
        tag = os.path.basename(path)[: -len(".json")]
        for r in rec["results"]:
            unit = r.get("unit", "samples/s")
            key = unit.replace("/s", "_per_s_median")
            if key not in r and "samples_per_s_median" not in r:
                continue
            what = {
                "augment": lambda r: f"augmentation {r['version']}",
                "embed": lambda r: f"embed {r['seconds']:g} s clips",
            }.get(rec["benchmark"], lambda r: r.get("case") or r.get("stage"))(r)
            rows.append({
                "file": tag,
                "backend": rec["backend"],
                "what": what,
                "batch": r.get("batch", rec.get("batch")),
                "rate": r.get(key, r.get("samples_per_s_median")),
                "unit": unit if key in r else "samples/s",
                "cpu_bound": r.get(f"cpu_bound_{unit.split('/')[0]}_per_s"),
                "audioset_h": r.get("audioset_100_epochs_h"),
                "load": rec["machine"]["load_average"][0],
            })
    print_table(rows, [("backend", "backend"), ("what", "benchmark"), ("batch", "batch"),
                       ("rate", "median"), ("unit", "unit"), ("cpu_bound", "CPU-bound est."),
                       ("audioset_h", "100 AudioSet epochs (h)"), ("load", "load avg"), ("file", "result file")])


if __name__ == "__main__":
    import glob

    summary(sys.argv[1:] or glob.glob(os.path.join(RESULTS, "*.json")))
