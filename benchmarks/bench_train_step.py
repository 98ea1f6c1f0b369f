"""Full BYOL-A training step (augmentation included) under `model.fit()`, samples/s.

    python benchmarks/bench_train_step.py --backend jax [--cases v1-512 v1-2048 v2]
        [--batch 64 256] [--steps 20] [--warmup 3] [--out JSON] [--quick]
        [--batchnorm per_view joint] [--official OFFICIAL_JSON ...]

One process per backend. Each case builds `BYOLA` (v1: AudioNTT2020(d), Adam
3e-4; v2: AudioNTT2022 d=3072, Adam 1e-4; epsilon 1e-8; per-view BatchNorm
unless `--batchnorm` lists other forms, each timed), compiles it with the default
`jit_compile="auto"` (XLA on JAX and TensorFlow, eager on PyTorch) and runs
`fit()` for warm-up + timed steps on random log-mel batches `[B, 64, 96, 1]`.
A callback stamps the end of every batch; Keras converts the batch logs to
Python floats before user callbacks run, so every stamp follows a host sync
and the differences are whole steps (data, augmentation, forward, backward,
Adam, EMA target update). The first `--warmup` steps (compilation) are dropped.
Each row also projects the hours of a 100-epoch AudioSet pretraining
(1,963,807 clips, one segment per clip per epoch) at the median rate, assuming
the data pipeline keeps up (`bench_pipeline.py` measures whether it does).

`--official` takes JSON files written by the official code's timing driver
(`../shared/official-harness/bench_official.py`, run on the same machine in
the same session) and prints the ratio of our rate to the official one for
each case both measured (same batch): median samples/s, the fastest step's
(the least disturbed by other processes on a shared machine) and CPU seconds
per step, with the official run's malloc setting. The rows go into the JSON
record as `vs_official`.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench  # noqa: E402

CASES = {
    "v1-512": ("v1", 512),
    "v1-1024": ("v1", 1024),
    "v1-2048": ("v1", 2048),
    "v2": ("v2", 3072),
}
# AudioSet as the papers pretrain on it: one random segment per clip per epoch.
AUDIOSET_CLIPS = 1_963_807
AUDIOSET_EPOCHS = 100


def audioset_hours(samples_per_s, clips=AUDIOSET_CLIPS, epochs=AUDIOSET_EPOCHS):
    """Hours for `epochs` passes over `clips` segments at `samples_per_s`
    (the training step alone: data loading is assumed to keep up)."""
    return clips * epochs / samples_per_s / 3600.0


def build_parser(description=__doc__.splitlines()[0], cases=("v1-512", "v1-2048", "v2")):
    p = _bench.parser(description)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(cases))
    p.add_argument("--jit", choices=("auto", "true", "false"), default="auto",
                   help="compile(jit_compile=...); 'auto' = XLA on JAX/TF, eager on torch.")
    p.add_argument("--mixed-precision", dest="mixed_precision", default=None,
                   choices=("mixed_bfloat16", "mixed_float16"))
    p.add_argument("--batchnorm", nargs="+", choices=("per_view", "joint"), default=["per_view"],
                   help="BYOLA(batchnorm=...) forms to time (default: per_view).")
    p.add_argument("--official", nargs="+", default=[], metavar="JSON",
                   help="bench_official.py result files: print our/official ratios per case.")
    return p


def official_ratios(rows, records):
    """Our rows joined with the official driver's rows of the same case and
    batch (`records`: its JSON files, already read), one dict per pair."""
    out = []
    for record in records:
        for theirs in record.get("results", []):
            counterpart = str(theirs.get("byola_keras_counterpart") or "")
            for ours in rows:
                if counterpart != f"bench_train_step.py {ours['case']}" or theirs.get("batch") != ours["batch"]:
                    continue
                ratio = lambda a, b: round(a / b, 2) if a and b else None  # noqa: E731
                out.append({
                    "case": ours["case"],
                    "batch": ours["batch"],
                    "batchnorm": ours["batchnorm"],
                    "official_malloc": record.get("malloc"),
                    "official_samples_per_s": theirs.get("samples_per_s_median"),
                    "samples_per_s": ours["samples_per_s_median"],
                    "ratio": ratio(ours["samples_per_s_median"], theirs.get("samples_per_s_median")),
                    "best_step_ratio": ratio(ours["samples_per_s_max"], theirs.get("samples_per_s_max")),
                    "official_cpu_s_per_step": theirs.get("cpu_s_per_step_median"),
                    "cpu_s_per_step": ours.get("cpu_s_per_step_median"),
                    "cpu_ratio": ratio(theirs.get("cpu_s_per_step_median"), ours.get("cpu_s_per_step_median")),
                    "official_peak_rss_mib": theirs.get("peak_rss_mib"),
                    "official_time": record.get("time"),
                    "official_cpu": (record.get("machine") or {}).get("cpu"),
                    "official_load_average": (record.get("machine") or {}).get("load_average"),
                })
    return out


def make_learner(version, dim, jit="auto", seed=0, input_shape=(64, 96, 1), batchnorm="per_view"):
    import keras

    from byola_keras.defaults import COMMON_DEFAULTS, VERSION_DEFAULTS
    from byola_keras.models import BYOLA, AudioNTT2020, AudioNTT2022

    encoder = AudioNTT2020(d=dim) if version == "v1" else AudioNTT2022(d=dim)
    model = BYOLA(
        encoder, version=version, mean=-5.5, std=5.0, seed=seed, input_shape=input_shape,
        batchnorm=batchnorm,
    )
    jit_compile = {"auto": "auto", "true": True, "false": False}[jit]
    optimizer = keras.optimizers.Adam(
        VERSION_DEFAULTS[version]["lr"], epsilon=COMMON_DEFAULTS["adam_epsilon"]
    )
    model.compile(optimizer=optimizer, jit_compile=jit_compile)
    return model


class RepeatBatches:
    """A `keras.utils.PyDataset` cycling a few fixed host batches (negligible cost)."""

    def __new__(cls, batches, steps):
        import keras

        class _Repeat(keras.utils.PyDataset):
            def __init__(self):
                super().__init__()
                self.batches = batches
                self.steps = steps

            def __len__(self):
                return self.steps

            def __getitem__(self, index):
                return self.batches[index % len(self.batches)]

        return _Repeat()


def random_batches(batch, count=4, shape=(64, 96, 1), seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.normal(-5.5, 5.0, (batch, *shape)).astype("float32") for _ in range(count)]


def time_fit(model, batch, steps, warmup):
    """Per-step seconds of `fit()` over warm-up + timed steps, and the first step's time."""
    timer = _bench.fit_step_timer()
    data = RepeatBatches(random_batches(batch), warmup + steps)
    started = time.perf_counter()
    history = model.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
    total = time.perf_counter() - started
    first = timer.stamps[1] - timer.stamps[0]
    loss = history.history["loss"][-1]
    return timer.step_seconds(warmup), timer.cpu_step_seconds(warmup), first, total, loss


def run_case(case, batch, args, batchnorm="per_view"):
    import keras

    version, dim = CASES[case]
    keras.backend.clear_session()  # this also resets the global dtype policy
    if args.mixed_precision:
        keras.config.set_dtype_policy(args.mixed_precision)
    from byola_keras import seeding  # keras.utils' would import TensorFlow on every backend

    seeding.set_random_seed(0)
    model = make_learner(version, dim, jit=args.jit, batchnorm=batchnorm)
    times, cpu, first, total, loss = time_fit(model, batch, args.steps, args.warmup)
    row = {
        "case": case,
        "version": version,
        "d": dim,
        "batch": batch,
        "batchnorm": batchnorm,
        "input_shape": [batch, 64, 96, 1],
        "jit_compile": str(model.jit_compile),
        "dtype_policy": keras.config.dtype_policy().name,
        "first_step_s": round(first, 2),
        "final_loss": round(float(loss), 4),
        **_bench.summarize(times, batch, cpu_step_seconds=cpu),
    }
    row["audioset_100_epochs_h"] = round(audioset_hours(row["samples_per_s_median"]), 1)
    return row


def main(argv=None, name="train_step", parser=None):
    p = parser or build_parser()
    args = _bench.parse_args(p, argv, steps=12, warmup=3, quick_steps=10, quick_warmup=2)
    batches = args.batch or [64]
    cases = args.cases[:1] if args.quick else args.cases
    rows = []
    forms = getattr(args, "batchnorm", None) or ["per_view"]
    for case in cases:
        for batch in batches:
            for batchnorm in forms:
                row = run_case(case, batch, args, batchnorm)
                rows.append(row)
                print(
                    f"[{args.backend}] {case} batch {batch} {batchnorm}: "
                    f"{row['samples_per_s_median']:.1f} samples/s "
                    f"(step {row['step_ms_median']:.0f} ms, first step {row['first_step_s']} s)",
                    flush=True,
                )
    for row in rows:
        row["backend"] = args.backend
    _bench.print_table(
        rows,
        [
            ("backend", "backend"),
            ("case", "case"),
            ("batch", "batch"),
            ("batchnorm", "batchnorm"),
            ("samples_per_s_median", "samples/s (median)"),
            ("samples_per_s_min", "min"),
            ("samples_per_s_max", "max"),
            ("step_ms_median", "step ms"),
            ("cpu_bound_samples_per_s", "CPU-bound est."),
            ("audioset_100_epochs_h", "100 AudioSet epochs (h)"),
        ],
    )
    extra = {}
    if getattr(args, "official", None):
        import json

        records = []
        for path in args.official:
            with open(path) as f:
                records.append(json.load(f))
        pairs = official_ratios(rows, records)
        for pair in pairs:
            pair["backend"] = args.backend
        print(f"\nAgainst the official code ({', '.join(args.official)}); CPU: "
              f"{_bench.machine_info()['cpu']} {' '.join(_bench.machine_info()['cpu_vector_extensions'])}")
        _bench.print_table(
            pairs,
            [
                ("backend", "backend"),
                ("case", "case"),
                ("official_malloc", "official malloc"),
                ("official_samples_per_s", "official samples/s"),
                ("samples_per_s", "ours samples/s"),
                ("ratio", "ratio"),
                ("best_step_ratio", "fastest-step ratio"),
                ("cpu_ratio", "CPU s/step ratio (official/ours)"),
                ("official_time", "official run"),
            ],
        )
        extra["vs_official"] = pairs
    out = args.out or _bench.default_out(name, args.backend)
    _bench.write_json(
        out,
        _bench.record(
            name, args, rows,
            audioset_projection={"clips": AUDIOSET_CLIPS, "epochs": AUDIOSET_EPOCHS,
                                 "assumes": "the training step's median rate; data loading keeps up"},
            **extra,
        ),
    )
    return rows


if __name__ == "__main__":
    main()
