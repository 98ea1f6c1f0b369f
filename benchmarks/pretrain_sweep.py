#!/usr/bin/env python
"""Several BYOL-A pretrainings on one corpus, with encoders saved along the way.

For the same-budget A/B comparisons and the ablation of docs/results.md: every
run trains `pretrain.build_learner(settings)` with `model.fit()` on the same
segments (same data seed), and writes its encoder at the chosen epochs, so a
learning curve and several budgets come out of one run. Evaluate the saved
encoders with `benchmarks/linear_eval.py --pretrained NAME=DIR`.

    # pack a log-mel cache into one file (to carry it to another machine)
    python benchmarks/pretrain_sweep.py pack CACHE_DIR pool.npz
    # train: one --run per configuration, settings as key=value (JSON values)
    python benchmarks/pretrain_sweep.py train pool.npz --out runs/sweep \\
        --epochs 200 --save-at 25,50,100,200 --set dim=512 batch_size=128 \\
        --run faithful --run joint batchnorm='"joint"' --run keras_init init='"keras"'

Each run writes OUT/NAME/eEPOCH/encoder.keras (a WaveformEncoder) and
OUT/NAME/history.csv (loss and embedding spread per epoch, as it trains) and
OUT/NAME/history.json (the same with the settings and seconds, at the end).
"""

import argparse
import json
import os
import sys
import time

import numpy as np


class PackedLogMels:
    """In-memory clips, with the `LogMelCache` reading interface `SegmentDataset` uses."""

    def __init__(self, paths):
        parts = [np.load(path) for path in paths]
        frames, starts, offset = [], [], 0
        for part in parts:
            frames.append(part["frames"])  # [frames, n_mels] float16, clips concatenated
            starts.append(part["starts"] + offset)
            offset += len(part["frames"])
        self.frames = np.concatenate(frames)
        self.starts = np.concatenate(starts)
        self.lengths = np.concatenate([part["lengths"] for part in parts])
        self.n_mels = self.frames.shape[1]
        # Every part carries the statistics of the whole corpus.
        self.mean, self.std = float(parts[0]["mean"]), float(parts[0]["std"])

    def __len__(self):
        return len(self.lengths)

    def read(self, i, start=0, stop=None):
        length = int(self.lengths[i])
        stop = length if stop is None else min(int(stop), length)
        s = int(self.starts[i])
        return self.frames[s + int(start) : s + stop].astype(np.float32).T


def pack(cache_dir, out):
    from byola_keras import data as data_lib

    cache = data_lib.LogMelCache(cache_dir)
    mean, std = data_lib.compute_norm_stats(cache)
    clips = [cache.read(i).T for i in range(len(cache))]
    lengths = np.array([c.shape[0] for c in clips], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    np.savez(out, frames=np.concatenate(clips).astype(np.float16), starts=starts,
             lengths=lengths, mean=mean, std=std)
    print(f"{len(clips)} clips, {int(lengths.sum())} frames, mean {mean:.4f} std {std:.4f} -> {out}")


def _value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _settings(pairs):
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"setting {pair!r}: expected key=value")
        out[key] = _value(value)
    return out


def train(args):
    import keras

    from byola_keras import data as data_lib
    from byola_keras import pretrain
    from byola_keras.models import WaveformEncoder

    corpus = PackedLogMels(args.corpus)
    save_at = {int(e) for e in args.save_at.split(",")}
    common = _settings(args.set or [])
    runs = [(spec[0], _settings(spec[1:])) for spec in args.run] or [("default", {})]
    print(f"{len(corpus)} clips; runs: {[name for name, _ in runs]}", flush=True)

    for name, overrides in runs:
        run_dir = os.path.join(args.out, name)
        if os.path.exists(os.path.join(run_dir, "history.json")):
            print(f"{name}: done already", flush=True)
            continue
        os.makedirs(run_dir, exist_ok=True)
        keras.backend.clear_session()
        settings = pretrain.resolve_settings({**common, "epochs": args.epochs, **overrides})
        epochs = int(settings["epochs"])
        run_save_at = {e for e in save_at if e <= epochs} | {epochs}
        from byola_keras import seeding  # keras.utils' would import TensorFlow on every backend

        seeding.set_random_seed(int(settings["seed"]))
        model = pretrain.build_learner(
            settings, corpus.mean, corpus.std, steps_per_execution=args.steps_per_execution
        )
        dataset = data_lib.SegmentDataset(
            corpus, batch_size=int(settings["batch_size"]), seed=args.data_seed,
            steps_per_epoch=settings["steps_per_epoch"],
        )

        class Save(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch + 1 in run_save_at:
                    target = os.path.join(run_dir, f"e{epoch + 1:04d}")
                    os.makedirs(target, exist_ok=True)
                    WaveformEncoder.from_learner(self.model).save(os.path.join(target, "encoder.keras"))

        started = time.time()
        history = model.fit(dataset, epochs=epochs, shuffle=False, verbose=args.verbose,
                            callbacks=[Save(), keras.callbacks.CSVLogger(os.path.join(run_dir, "history.csv"))])
        seconds = time.time() - started
        record = {
            "name": name, "settings": settings, "seconds": seconds, "clips": len(corpus),
            "samples_per_second": epochs * len(dataset) * int(settings["batch_size"]) / seconds,
            "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
            "backend": keras.backend.backend(),
        }
        with open(os.path.join(run_dir, "history.json"), "w") as f:
            json.dump(record, f, indent=1)
        loss = record["history"].get("loss", [float("nan")])
        print(f"{name}: {epochs} epochs in {seconds:.0f} s "
              f"({record['samples_per_second']:.0f} samples/s), loss {loss[0]:.4f} -> {loss[-1]:.4f}",
              flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack a LogMelCache folder into one .npz")
    p.add_argument("cache_dir")
    p.add_argument("out")
    t = sub.add_parser("train", help="run the pretrainings")
    t.add_argument("corpus", nargs="+", help=".npz file(s) written by `pack` (parts are concatenated)")
    t.add_argument("--out", required=True)
    t.add_argument("--epochs", type=int, required=True, help="epochs of every run (a run may set its own)")
    t.add_argument("--save-at", default="", help="comma-separated epochs at which to save the encoder")
    t.add_argument("--set", nargs="*", help="settings for every run, key=value")
    t.add_argument("--run", nargs="+", action="append", default=[],
                   metavar=("NAME", "KEY=VALUE"), help="one run: a name, then its own settings")
    t.add_argument("--data-seed", type=int, default=0)
    t.add_argument("--steps-per-execution", type=int, default=1, help="train steps per compiled call")
    t.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.cache_dir, args.out)
    else:
        args.save_at = args.save_at or str(args.epochs)
        train(args)


if __name__ == "__main__":
    sys.exit(main())
