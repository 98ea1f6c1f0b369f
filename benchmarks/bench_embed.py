"""Embedding extraction: waveform -> clip embedding, clips/s.

    python benchmarks/bench_embed.py --backend jax [--seconds 1 10] [--batch 64]
        [--dim 2048] [--steps 10] [--warmup 2] [--out JSON] [--quick]

`FeatureExtractor.embed_batch` on 16 kHz clips: LogMelSpectrogram, the
pre-normalization and an AudioNTT2020 encoder (d=2048, random weights: speed
does not depend on them), compiled as `predict_on_batch` compiles it (XLA on
JAX, the TensorFlow graph, PyTorch eager), returning clip and frame
embeddings as NumPy arrays (so every call ends with a host sync). A
comparison with the official code needs both run side by side on one machine:
`docs/performance.md`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench  # noqa: E402

DEFAULT_BATCH = {1.0: 64, 10.0: 8}


def build_parser():
    p = _bench.parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, nargs="+", default=[1.0, 10.0], help="Clip lengths.")
    p.add_argument("--dim", type=int, default=2048, help="AudioNTT2020 embedding size.")
    return p


def run_case(seconds, batch, args):
    import keras
    import numpy as np

    from byola_keras.embed import FeatureExtractor
    from byola_keras.models import AudioNTT2020

    keras.backend.clear_session()
    from byola_keras import seeding  # keras.utils' would import TensorFlow on every backend

    seeding.set_random_seed(0)
    extractor = FeatureExtractor(AudioNTT2020(d=args.dim), mean=-5.49, std=5.04, batch_size=batch)
    samples = int(round(seconds * extractor.sample_rate))
    wave = np.random.default_rng(0).normal(0.0, 0.1, (batch, samples)).astype("float32")
    clip_shape = {}

    def step():
        clip, _ = extractor.embed_batch(wave)
        clip_shape["shape"] = list(clip.shape)

    times, cpu = _bench.time_calls(step, args.steps, args.warmup)
    row = {
        "seconds": seconds,
        "batch": batch,
        "input_shape": [batch, samples],
        "embedding_shape": clip_shape["shape"],
        "d": args.dim,
        **_bench.summarize(times, batch, unit="clips", cpu_step_seconds=cpu),
    }
    return row


def main(argv=None):
    p = build_parser()
    args = _bench.parse_args(p, argv, steps=10, warmup=2, quick_steps=10, quick_warmup=1)
    seconds = args.seconds[:1] if args.quick else args.seconds
    rows = []
    for s in seconds:
        for batch in args.batch or [DEFAULT_BATCH.get(s, 16)]:
            row = run_case(s, batch, args)
            row["backend"] = args.backend
            rows.append(row)
            print(f"[{args.backend}] {s:g} s clips, batch {batch}: {row['clips_per_s_median']:,.1f} clips/s", flush=True)
    _bench.print_table(
        rows,
        [
            ("backend", "backend"),
            ("seconds", "clip s"),
            ("batch", "batch"),
            ("clips_per_s_median", "clips/s (median)"),
            ("clips_per_s_min", "min"),
            ("clips_per_s_max", "max"),
            ("step_ms_median", "ms/batch"),
            ("cpu_bound_clips_per_s", "CPU-bound est."),
        ],
    )
    out = args.out or _bench.default_out("embed", args.backend)
    _bench.write_json(out, _bench.record("embed", args, rows))
    return rows


if __name__ == "__main__":
    main()
