"""Full BYOL-A training step (augmentation included) under `model.fit()`, samples/s.

    python benchmarks/bench_train_step.py --backend jax [--cases v1-512 v1-2048 v2]
        [--batch 64 256] [--steps 20] [--warmup 3] [--out JSON] [--quick]
        [--batchnorm per_view joint]

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
    return p


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
    keras.utils.set_random_seed(0)
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
    out = args.out or _bench.default_out(name, args.backend)
    _bench.write_json(
        out,
        _bench.record(
            name, args, rows,
            audioset_projection={"clips": AUDIOSET_CLIPS, "epochs": AUDIOSET_EPOCHS,
                                 "assumes": "the training step's median rate; data loading keeps up"},
        ),
    )
    return rows


if __name__ == "__main__":
    main()
