"""`byola-keras pretrain`: BYOL-A pretraining from a folder of audio files.

    byola-keras pretrain [AUDIO_DIR] --epochs N --batch-size B --out DIR
        [--version v1|v2] [--dim D] [--backend jax] [--config BEST.json]
        [--data-parallel [--host-devices N]]

Decodes the folder once into a sharded log-mel cache, computes the
pre-normalization statistics, and trains `BYOLA` with `model.fit()`. A full
checkpoint (weights, optimizer state, EMA target, mixup memory bank) is written
atomically after every epoch (`DIR/checkpoint.keras` + `DIR/state.json`), and a
re-run with the same `--out` resumes from it. At the end `DIR/encoder.keras` and
`DIR/norm_stats.json` hold what downstream use needs. Without AUDIO_DIR a small
built-in synthetic corpus is used (no download). `--data-parallel` trains
over every device the backend sees (JAX: `keras.distribution.DataParallel`;
TensorFlow: `tf.distribute.MirroredStrategy`); `--host-devices N` splits the
CPU into N devices to try it without accelerators.
"""

import contextlib
import json
import math
import os
import time

import keras

from byola_keras import data as data_lib
from byola_keras import defaults, distribute
from byola_keras.models import BYOLA, AudioNTT2020, AudioNTT2022

CHECKPOINT = "checkpoint.keras"
STATE = "state.json"
ENCODER = "encoder.keras"
STATS = "norm_stats.json"
CONFIG = "config.json"

# Keys a --config file may set (the tuner writes these), with their defaults
# (None: the version's, from `byola_keras.defaults`).
_COMMON = defaults.COMMON_DEFAULTS
DEFAULTS = {
    "version": "v1",
    "dim": None,  # v1: 2048, v2: 3072
    "epochs": _COMMON["epochs"],
    "batch_size": _COMMON["batch_size"],
    "lr": None,  # v1: 3e-4, v2: 1e-4
    "tau": _COMMON["tau"],
    "adam_epsilon": _COMMON["adam_epsilon"],
    "batchnorm": "per_view",  # BYOLA(batchnorm=...): "per_view" (official) or "joint"
    "init": "torch",  # encoder and heads: "torch" (official) or "keras"
    "steps_per_epoch": None,
    "seed": 0,
    "mixed_precision": None,
    "alpha": None,
    "memory_size": _COMMON["memory_size"],
    "virtual_crop_scale": list(_COMMON["virtual_crop_scale"]),
    "freq_scale": list(_COMMON["freq_scale"]),
    "time_scale": list(_COMMON["time_scale"]),
    "fader_gain": "default",
    "use_pre_norm": True,
    "use_mixup": True,
    "use_resize_crop": True,
    "use_post_norm": True,
}
_AUGMENTATION_KEYS = BYOLA._AUGMENTATION_KEYS


def state_fingerprint(model):
    """Checksums of what a resumed run must carry over: optimizer step, EMA target
    weights, mixup memory bank (printed on resume; compared by the tests)."""
    to_np = keras.ops.convert_to_numpy
    mixup = model.augmentation.mixup
    return {
        "optimizer_iterations": int(to_np(model.optimizer.iterations)),
        "target_sum": float(sum(float(to_np(v).astype("float64").sum()) for v in model.target_variables)),
        "memory_sum": float(to_np(mixup.memory).astype("float64").sum()) if mixup.built else 0.0,
        "memory_filled": int(to_np(mixup.memory_filled)) if mixup.built else 0,
    }


def _remove_stale_temporaries(out):
    for name in os.listdir(out):
        if ".tmp-" in name:
            os.remove(os.path.join(out, name))


class PretrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _atomic_write_json(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save(model, path):
    tmp = f"{path}.tmp-{os.getpid()}.keras"
    model.save(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss and remembers where."""

    def __init__(self):
        super().__init__()
        self.failed_at = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.failed_at = (self._epoch, batch)
            self.model.stop_training = True


class EpochCheckpoint(keras.callbacks.Callback):
    """Writes the whole learner (and `state.json`) atomically after each epoch,
    unless the loss went non-finite during it."""

    def __init__(self, out_dir, guard, extra_state):
        super().__init__()
        self.out_dir = out_dir
        self.guard = guard
        self.extra_state = extra_state

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.failed_at is not None:
            return
        _atomic_save(self.model, os.path.join(self.out_dir, CHECKPOINT))
        state = {
            "epochs_done": epoch + 1,
            "optimizer_iterations": int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)),
            "logs": {k: float(v) for k, v in (logs or {}).items()},
            **self.extra_state,
        }
        _atomic_write_json(os.path.join(self.out_dir, STATE), state)


def resolve_settings(config=None, **overrides):
    """Merge defaults < config file < explicit overrides (None = not given)."""
    settings = dict(DEFAULTS)
    for source in (config or {}), overrides:
        unknown = set(source) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"Unknown pretraining setting(s): {sorted(unknown)}.")
        settings.update({k: v for k, v in source.items() if v is not None})
    if settings["version"] not in defaults.VERSIONS:
        raise ValueError(f"version must be 'v1' or 'v2'; got {settings['version']!r}.")
    version_defaults = defaults.VERSION_DEFAULTS[settings["version"]]
    for key in ("dim", "lr"):
        if settings[key] is None:
            settings[key] = version_defaults[key]
    if settings["batchnorm"] not in ("per_view", "joint"):
        raise ValueError(f"batchnorm must be 'per_view' or 'joint'; got {settings['batchnorm']!r}.")
    if settings["init"] not in ("torch", "keras"):
        raise ValueError(f"init must be 'torch' or 'keras'; got {settings['init']!r}.")
    if not float(settings["adam_epsilon"]) > 0:
        raise ValueError(f"adam_epsilon must be > 0; got {settings['adam_epsilon']}.")
    for key in ("epochs", "batch_size"):
        if int(settings[key]) < 1:
            raise ValueError(f"{key} must be >= 1; got {settings[key]}.")
    return settings


def build_encoder(version, dim, init="torch"):
    if version == "v1":
        return AudioNTT2020(d=int(dim), init=init)
    return AudioNTT2022(d=int(dim), init=init)


def build_learner(
    settings,
    mean,
    std,
    input_shape=(64, 96, 1),
    projection_hidden=defaults.COMMON_DEFAULTS["projection_hidden"],
    projection_dim=defaults.COMMON_DEFAULTS["projection_dim"],
    **compile_kwargs,
):
    """A compiled `BYOLA` learner for `settings` (see `resolve_settings`).

    `projection_hidden` / `projection_dim` size the projector and predictor
    MLPs (the papers' 4096 / 256); `compile_kwargs` go to `model.compile`
    (e.g. `jit_compile`, `run_eagerly`).
    """
    augmentation = {k: settings[k] for k in _AUGMENTATION_KEYS}
    for key in ("virtual_crop_scale", "freq_scale", "time_scale"):
        augmentation[key] = tuple(augmentation[key])
    model = BYOLA(
        encoder=build_encoder(settings["version"], settings["dim"], settings["init"]),
        version=settings["version"],
        mean=mean,
        std=std,
        tau=settings["tau"],
        projection_hidden=projection_hidden,
        projection_dim=projection_dim,
        input_shape=input_shape,
        seed=settings["seed"],
        batchnorm=settings["batchnorm"],
        init=settings["init"],
        **augmentation,
    )
    optimizer = keras.optimizers.Adam(settings["lr"], epsilon=float(settings["adam_epsilon"]))
    model.compile(optimizer=optimizer, **compile_kwargs)
    return model


def pretrain(
    audio_dir=None,
    out="runs/byola",
    config=None,
    cache_dir=None,
    workers=None,
    verbose="auto",
    data_parallel=False,
    host_devices=None,
    **overrides,
):
    """Pretrain BYOL-A; returns a dict with the output paths and the history.

    Args:
        audio_dir: folder of audio files (searched recursively); `None` uses the
            built-in synthetic corpus.
        out: output folder (checkpoints, encoder, statistics); a re-run resumes.
        config: dict of settings (e.g. loaded from the tuner's best JSON).
        cache_dir: where decoded log-mels are cached (default `OUT/cache`).
        workers: decoding threads.
        data_parallel: train over every device of the backend (JAX or
            TensorFlow; see `distribute.data_parallel_scope`); the batch size
            must be a multiple of the device count.
        host_devices: split the CPU into this many devices first (to try
            `data_parallel` without accelerators); must come before anything
            initialises the backend in this process.
        **overrides: any key of `DEFAULTS`.
    """
    if host_devices is not None and not data_parallel:
        raise ValueError("host_devices is only used with data_parallel=True.")
    if data_parallel:
        if host_devices is not None:
            distribute.host_devices(host_devices)
        scope, replicas = distribute.data_parallel_scope()
    else:
        scope, replicas = contextlib.nullcontext(), 1
    settings = resolve_settings(config, **overrides)
    if int(settings["batch_size"]) % replicas:
        raise ValueError(
            f"batch_size {settings['batch_size']} is not a multiple of the {replicas} devices "
            "of data-parallel training."
        )
    os.makedirs(out, exist_ok=True)
    _remove_stale_temporaries(out)  # left by a run killed while writing
    if settings["mixed_precision"]:
        keras.config.set_dtype_policy(settings["mixed_precision"])
    keras.utils.set_random_seed(int(settings["seed"]))

    if audio_dir is None:
        audio_dir = data_lib.make_default_corpus()
        print(f"No AUDIO_DIR given: using the built-in synthetic corpus in {audio_dir}")
    files = data_lib.find_audio_files(audio_dir)
    cache = data_lib.LogMelCache.build(
        files, cache_dir or os.path.join(out, "cache"), workers=workers
    )

    stats_path = os.path.join(out, STATS)
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            stats = json.load(f)
        mean, std = stats["mean"], stats["std"]
    else:
        mean, std = data_lib.compute_norm_stats(cache)
        _atomic_write_json(
            stats_path,
            {"mean": mean, "std": std, "frontend": "slaney", "clips": len(cache)},
        )
    print(f"Pre-normalization statistics: mean={mean:.4f} std={std:.4f}")

    batch_size = int(settings["batch_size"])
    if batch_size > len(cache):
        usable = len(cache) - len(cache) % replicas
        if usable < 1:
            raise ValueError(f"{len(cache)} clips are fewer than the {replicas} data-parallel devices.")
        print(f"batch_size {batch_size} > {len(cache)} clips: using {usable}.")
        batch_size = usable
    if data_parallel:
        print(f"Data-parallel training over {replicas} device(s), {batch_size // replicas} samples each.")
    dataset = data_lib.SegmentDataset(
        cache,
        batch_size=batch_size,
        seed=int(settings["seed"]),
        steps_per_epoch=settings["steps_per_epoch"],
    )

    with scope:  # data-parallel: build or load, train and save on every device
        checkpoint_path = os.path.join(out, CHECKPOINT)
        state_path = os.path.join(out, STATE)
        initial_epoch = 0
        if os.path.exists(checkpoint_path) and os.path.exists(state_path):
            with open(state_path) as f:
                initial_epoch = int(json.load(f)["epochs_done"])
            model = keras.saving.load_model(checkpoint_path, safe_mode=True)
            print(f"Resuming from {checkpoint_path} after epoch {initial_epoch}.")
            print("Resumed state: " + json.dumps(state_fingerprint(model)))
        else:
            model = build_learner(settings, mean, std)
            _atomic_write_json(os.path.join(out, CONFIG), settings)
        dataset.epoch = initial_epoch

        history = {}
        epochs = int(settings["epochs"])
        if initial_epoch < epochs:
            guard = NonFiniteLossGuard()
            callbacks = [
                guard,
                EpochCheckpoint(out, guard, {"skipped_files": len(cache.skipped)}),
                keras.callbacks.CSVLogger(os.path.join(out, "history.csv"), append=True),
            ]
            started = time.time()
            fit = model.fit(
                dataset,
                epochs=epochs,
                initial_epoch=initial_epoch,
                callbacks=callbacks,
                verbose=verbose,
                shuffle=False,  # the dataset orders batches itself (resumable)
            )
            history = fit.history
            if guard.failed_at is not None:
                epoch, step = guard.failed_at
                raise PretrainingDiverged(
                    f"The loss became NaN/inf at epoch {epoch + 1}, step {step + 1}; training "
                    f"stopped. The last good checkpoint ({checkpoint_path}) is kept. Try a "
                    "lower learning rate, check the normalization statistics, or use float32."
                )
            print(f"Trained {epochs - initial_epoch} epoch(s) in {time.time() - started:.1f} s.")

        encoder_path = os.path.join(out, ENCODER)
        _atomic_save(model.encoder, encoder_path)
    print(f"Encoder: {encoder_path}  statistics: {stats_path}")
    return {
        "encoder": encoder_path,
        "stats": stats_path,
        "checkpoint": checkpoint_path,
        "history": history,
        "mean": mean,
        "std": std,
        "skipped_files": list(cache.skipped),
    }


def add_cli_arguments(parser):
    parser.add_argument("audio_dir", nargs="?", help="Folder of audio files (default: built-in corpus).")
    parser.add_argument("--out", default="runs/byola", help="Output folder (resumes if it holds a checkpoint).")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, dest="batch_size")
    parser.add_argument("--version", choices=("v1", "v2"))
    parser.add_argument("--dim", type=int, help="Embedding size (v1: 512/1024/2048; v2: 3072).")
    parser.add_argument("--lr", type=float, help="Adam learning rate (v1 3e-4, v2 1e-4).")
    parser.add_argument("--steps-per-epoch", type=int, dest="steps_per_epoch")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--mixed-precision", dest="mixed_precision", choices=("mixed_bfloat16", "mixed_float16")
    )
    parser.add_argument("--config", help="JSON file of settings (e.g. the tuner's best).")
    parser.add_argument("--cache-dir", dest="cache_dir", help="Log-mel cache (default OUT/cache).")
    parser.add_argument("--workers", type=int, help="Decoding threads.")
    parser.add_argument(
        "--data-parallel", dest="data_parallel", action="store_true",
        help="Train over every device (JAX: keras.distribution.DataParallel; TensorFlow: "
        "MirroredStrategy); the batch size must be a multiple of the device count.",
    )
    parser.add_argument(
        "--host-devices", dest="host_devices", type=int,
        help="With --data-parallel: split the CPU into this many devices (to try it without GPUs).",
    )
    parser.add_argument(
        "--verbose", type=int, choices=(0, 1, 2), default=None,
        help="0 silent, 1 progress bar (default on a terminal), 2 one line per epoch.",
    )


def run_cli(args):
    config = None
    if args.config:
        with open(args.config) as f:
            config = json.load(f)
        config = config.get("settings", config)
    overrides = {
        key: getattr(args, key)
        for key in ("epochs", "batch_size", "version", "dim", "lr", "steps_per_epoch", "seed", "mixed_precision")
    }
    try:
        pretrain(
            args.audio_dir,
            out=args.out,
            config=config,
            cache_dir=args.cache_dir,
            workers=args.workers,
            verbose="auto" if args.verbose is None else args.verbose,
            data_parallel=args.data_parallel,
            host_devices=args.host_devices,
            **overrides,
        )
    except PretrainingDiverged as error:
        print(f"error: {error}")
        return 3
    except (FileNotFoundError, ValueError, data_lib.AudioDecodeError) as error:
        print(f"error: {error}")
        return 2
    return 0


def load_stats(path):
    """(mean, std) from a `norm_stats.json` file."""
    with open(path) as f:
        stats = json.load(f)
    return float(stats["mean"]), float(stats["std"])


__all__ = ["pretrain", "resolve_settings", "build_learner", "load_stats", "PretrainingDiverged"]
