"""XLA's memory plan of the JAX training step, per case (MiB).

    KERAS_BACKEND=jax python benchmarks/bench_step_memory.py [--cases v1-512 v1-2048 v2]
        [--batch 64] [--out JSON]

Builds `BYOLA` as `bench_train_step.py` does (per-view BatchNorm), runs one
`fit()` step (which builds the optimizer and the metrics), then compiles the
same training step the way Keras's JAX trainer does (`jax.jit`, state
donated) and prints XLA's buffer assignment for it: the temporaries (one
block, allocated at every step's start and freed at its end), the arguments
(the learner's, the optimizer's and the metrics' state and the batch) and the
outputs not aliased to an argument. These are XLA's plan, not a measurement
of resident memory: they do not vary from run to run, which makes them the
figure to compare two versions of the code with on a busy machine. Peak
resident memory, which adds the imports, the compiled programs and malloc's
heap, is `bench_train_step.py`'s.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench  # noqa: E402
import bench_train_step  # noqa: E402

MIB = 2**20


def memory_plan(case, batch):
    import jax
    import keras

    version, dim = bench_train_step.CASES[case]
    keras.backend.clear_session()
    from byola_keras import seeding  # keras.utils' would import TensorFlow on every backend

    seeding.set_random_seed(0)
    model = bench_train_step.make_learner(version, dim, jit="true")
    x = bench_train_step.random_batches(batch, count=1)[0]
    model.fit(bench_train_step.RepeatBatches([x], 1), epochs=1, verbose=0, shuffle=False)
    state = model._get_jax_state(
        trainable_variables=True, non_trainable_variables=True, optimizer_variables=True,
        metrics_variables=True,
    )
    data = (jax.numpy.asarray(x),)
    compiled = jax.jit(model.train_step, donate_argnums=0).lower(state, data).compile()
    stats = compiled.memory_analysis()
    return {
        "case": case,
        "version": version,
        "d": dim,
        "batch": batch,
        "temp_mib": round(stats.temp_size_in_bytes / MIB, 1),
        "arguments_mib": round(stats.argument_size_in_bytes / MIB, 1),
        "outputs_not_aliased_mib": round(
            (stats.output_size_in_bytes - stats.alias_size_in_bytes) / MIB, 1
        ),
    }


def main(argv=None):
    p = _bench.parser(__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=sorted(bench_train_step.CASES),
                   default=["v1-512", "v1-2048", "v2"])
    args = _bench.parse_args(p, argv, steps=1, warmup=0, quick_steps=1, quick_warmup=0)
    if args.backend != "jax":
        raise SystemExit("--backend: this benchmark reads XLA's plan of the JAX step; use --backend jax")
    cases = args.cases[:1] if args.quick else args.cases
    rows = [memory_plan(case, batch) for case in cases for batch in (args.batch or [64])]
    _bench.print_table(rows, [
        ("case", "case"), ("batch", "batch"), ("temp_mib", "temporaries MiB"),
        ("arguments_mib", "arguments MiB"), ("outputs_not_aliased_mib", "outputs not aliased MiB"),
    ])
    out = args.out or _bench.default_out("step_memory", args.backend)
    _bench.write_json(out, _bench.record("step_memory", args, rows))


if __name__ == "__main__":
    main()
