"""A KerasTuner `HyperModel` that searches BYOL-A's augmentation settings.

Each trial builds a `BYOLA` learner with one draw of the augmentation settings
(mixup strength, the resize-crop ranges, the virtual crop canvas, optionally
the fader gain and the embedding width), pretrains it for a short, fixed budget
of optimizer steps on an unlabelled pool of audio, and scores the result by the
linear-probe accuracy on the validation split of a labelled task: the task's
train and valid clips are embedded with the trial's encoder (normalized with
the pool's statistics) and the papers' linear probe
(`byola_keras.evaluation.linear_probe`) is trained on them. The objective is
that validation accuracy, `probe_accuracy` (maximized). The BYOL loss is not
used: stronger augmentations make the pretext task harder, so losses of
different trials are not comparable. The task's test split is never read.

The expensive inputs are prepared once per search, not per trial, and kept on
disk in the search folder (`SearchData`): the pool is decoded into a
`LogMelCache`, its normalization statistics computed, and the task's train and
valid clips turned into log-mels. Several processes sharing the folder
(distributed search) prepare it under a file lock, so only the first decodes.

>>> data = SearchData("pool/", "manifest_words.csv", "runs/search").prepare()
>>> hypermodel = BYOLAHyperModel(data, budget_steps=200, batch_size=64)
>>> tuner = keras_tuner.RandomSearch(hypermodel, objective=OBJECTIVE, max_trials=20,
...                                  directory="runs/search", project_name="trials")
>>> tuner.search()
>>> hypermodel.settings(tuner.get_best_hyperparameters()[0])  # for `byola-keras pretrain --config`

`byola-keras tune` runs such a search from the command line.
"""

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import weakref

import keras
import keras_tuner
import numpy as np

from byola_keras import data as data_lib
from byola_keras import defaults
from byola_keras import frontend
from byola_keras import pretrain as pretrain_lib
from byola_keras import seeding
from byola_keras.evaluation import probes
from byola_keras.evaluation import tasks as tasks_lib
from byola_keras.evaluation.embedding import embed_log_mels, task_log_mels
from byola_keras._files import atomic_write_json as write_json
from byola_keras._files import file_lock, read_json, rss_mb

OBJECTIVE_NAME = "probe_accuracy"
OBJECTIVE = keras_tuner.Objective(OBJECTIVE_NAME, "max")

TASK_CACHE_FORMAT = "byola-keras-tuning-task-logmels"
TASK_CACHE_VERSION = 1
STATS_FILE = "pool_stats.json"
POOL_CACHE_DIR = "pool_cache"
TASK_CACHE_FILE = "task_logmels.npz"
LOCK_FILE = ".prepare.lock"

# The search space: (low, high) of each tuned value, and the paper's value as
# the default (what `hp.values` holds before a tuner draws).
SPACE = {
    "alpha": (0.0, 1.0),
    "freq_scale_low": (0.3, 1.0),
    "freq_scale_high": (1.0, 2.0),
    "time_scale_low": (0.3, 1.0),
    "time_scale_high": (1.0, 2.0),
    "virtual_crop_time": (1.0, 2.0),
    "fader_gain": (0.0, 1.5),
}


def _log(message):
    print(message, file=sys.stderr, flush=True)


def _pool_files(pool):
    """Audio files of the pool: a folder (searched recursively) or a CSV manifest."""
    pool = os.path.abspath(os.fspath(pool))
    if os.path.isfile(pool):
        if not pool.lower().endswith(".csv"):
            raise ValueError(f"--pool '{pool}' is a file but not a CSV manifest; give a folder of audio or a CSV.")
        return [row["path"] for row in data_lib.read_manifest(pool)]
    if not os.path.exists(pool):
        raise FileNotFoundError(f"--pool '{pool}' does not exist (expected a folder of audio files or a CSV manifest).")
    return data_lib.find_audio_files(pool)


@dataclasses.dataclass
class _TaskData:
    log_mels: list
    labels: np.ndarray
    splits: np.ndarray
    classes: list
    name: str


class SearchData:
    """The pool and the labelled task of a search, decoded once and cached in `work_dir`.

    Args:
        pool: folder of unlabelled audio (searched recursively) or a CSV
            manifest listing it (only its `path` column is used).
        task: CSV manifest `path,label,split` of the labelled task; its
            `train` and `valid` clips are used (a task without `valid` gets
            `valid_fraction` of train held out, stratified, seeded).
        work_dir: folder for the caches (the search folder).
        duration: None (whole task clips), seconds (crop / zero-pad), or "mean".
        valid_fraction, seed: the hold-out when the task has no valid split.
        workers: decoding threads for the pool cache (None: automatic).
        max_seconds: keep only a window this long of longer pool clips.

    Call `prepare()` (idempotent) before training. It holds a file lock in
    `work_dir` while it builds or reads the caches, so processes sharing the
    folder decode the data once between them.
    """

    def __init__(self, pool, task, work_dir, duration=None, valid_fraction=0.1, seed=0, workers=None, max_seconds=None):
        self.pool = os.path.abspath(os.fspath(pool))
        self.task_manifest = os.path.abspath(os.fspath(task))
        self.work_dir = os.path.abspath(os.fspath(work_dir))
        self.duration = duration
        self.valid_fraction = float(valid_fraction)
        self.seed = int(seed)
        self.workers = workers
        self.max_seconds = max_seconds
        self.cache = None
        self.mean = None
        self.std = None
        self.task = None

    @property
    def prepared(self):
        return self.cache is not None

    def prepare(self, verbose=True):
        """Builds (or reuses) the pool cache, its statistics and the task's log-mels."""
        if self.prepared:
            return self
        # Fail on a bad task before decoding the whole pool.
        task = tasks_lib.load_task(self.task_manifest)
        os.makedirs(self.work_dir, exist_ok=True)
        with file_lock(os.path.join(self.work_dir, LOCK_FILE)):
            files = _pool_files(self.pool)
            self.cache = data_lib.LogMelCache.build(
                files,
                os.path.join(self.work_dir, POOL_CACHE_DIR),
                workers=self.workers,
                max_seconds=self.max_seconds,
                progress=verbose,
            )
            self.mean, self.std = self._norm_stats()
            self.task = self._task_log_mels(task, verbose)
        if verbose:
            counts = {s: int(np.sum(self.task.splits == s)) for s in ("train", "valid")}
            _log(
                f"Pool: {len(self.cache)} clips (mean {self.mean:.4f}, std {self.std:.4f}); task "
                f"'{self.task.name}': {counts['train']} train / {counts['valid']} valid clips, "
                f"{len(self.task.classes)} classes."
            )
        return self

    def _norm_stats(self):
        path = os.path.join(self.work_dir, STATS_FILE)
        if os.path.isfile(path):
            stats = read_json(path)
            if stats.get("cache_fingerprint") == self.cache.fingerprint:
                return float(stats["mean"]), float(stats["std"])
        mean, std = data_lib.compute_norm_stats(self.cache)
        write_json(
            path,
            {
                "mean": mean,
                "std": std,
                "frontend": "slaney",
                "clips": len(self.cache),
                "cache_fingerprint": self.cache.fingerprint,
            },
        )
        return float(mean), float(std)

    def _task_key(self, task, rows):
        digest = hashlib.sha256()
        settings = {
            "format": TASK_CACHE_FORMAT,
            "version": TASK_CACHE_VERSION,
            "duration": self.duration,
            "valid_fraction": self.valid_fraction,
            "seed": self.seed,
        }
        digest.update(json.dumps(settings, sort_keys=True).encode())
        with open(task.manifest, "rb") as f:
            digest.update(f.read())
        for i in rows:
            stat = os.stat(task.paths[i])
            digest.update(f"{task.paths[i]}\0{stat.st_size}:{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()

    def _task_log_mels(self, task, verbose):
        index, _ = tasks_lib.task_split_indices(task, self.seed, self.valid_fraction)
        rows = np.concatenate([index["train"], index["valid"]])
        splits = np.asarray(["train"] * index["train"].size + ["valid"] * index["valid"].size)
        labels = task.labels[rows]
        key = self._task_key(task, rows)
        path = os.path.join(self.work_dir, TASK_CACHE_FILE)
        if os.path.isfile(path):
            with np.load(path, allow_pickle=False) as cached:
                if str(cached["key"]) == key:
                    frames, lengths = cached["frames"], cached["lengths"]
                    bounds = np.concatenate([[0], np.cumsum(lengths)])
                    log_mels = [np.ascontiguousarray(frames[a:b].T) for a, b in zip(bounds[:-1], bounds[1:])]
                    return _TaskData(log_mels, labels, splits, list(task.classes), task.name)
        if verbose:
            _log(f"Decoding {rows.size} train/valid clips of task '{task.name}'")
        subset = dataclasses.replace(
            task, paths=[task.paths[i] for i in rows], labels=labels, splits=splits
        )
        log_mels = task_log_mels(subset, duration=self.duration)
        tmp = f"{path}.tmp-{os.getpid()}.npz"
        np.savez(
            tmp,
            key=np.asarray(key),
            frames=np.concatenate([m.T for m in log_mels]).astype("float32"),
            lengths=np.asarray([m.shape[1] for m in log_mels], dtype="int64"),
        )
        os.replace(tmp, path)
        return _TaskData(log_mels, labels, splits, list(task.classes), task.name)

    def split(self, name):
        """`(log_mels, labels)` of the task's `train` or `valid` split."""
        rows = np.flatnonzero(self.task.splits == name)
        return [self.task.log_mels[i] for i in rows], self.task.labels[rows]


class BYOLAHyperModel(keras_tuner.HyperModel):
    """BYOL-A pretraining as a KerasTuner `HyperModel`, scored by a linear probe.

    Search space (names of the hyperparameters):
        `alpha` mixup strength in [0, 1]; `freq_scale_low` / `freq_scale_high`
        and `time_scale_low` / `time_scale_high`: the resize-crop ranges, lower
        end in [0.3, 1], upper end in [1, 2]; `virtual_crop_time`: the width of
        the virtual crop canvas relative to the segment, in [1, 2] (the height
        stays 1); with `tune_fader`, `fader_gain` in [0, 1.5]; with `dims`,
        `dim`, one of the given embedding widths.

    `build(hp)` returns a compiled `BYOLA` (built in its constructor, so
    `tuner.get_best_models()` works). `fit(hp, model, ...)` pretrains it for
    `budget_steps` optimizer steps (Hyperband: `epochs` of `steps_per_epoch`
    steps, continuing from `initial_epoch`), embeds the task's train and valid
    clips with `model.encoder` and the pool's statistics, trains the linear
    probe and returns `{"probe_accuracy": valid accuracy, ...}`. A trial whose
    loss or embeddings become non-finite fails (`FailedTrialError`) instead of
    reporting a score.

    Args:
        data: a `SearchData` (prepared on the first `fit` if it is not yet).
        version: "v1" or "v2" (sets the encoder and the fixed defaults).
        dim: embedding width when it is not tuned (None: 2048 v1 / 3072 v2).
        dims: a list of widths to choose from (tunes `dim`), or None.
        tune_fader: also tune the random linear fader's gain.
        budget_steps: optimizer steps per trial.
        steps_per_epoch: steps per Keras epoch (default `budget_steps`;
            Hyperband's unit of budget).
        batch_size: segments per step.
        lr, tau, memory_size: fixed learner settings (None: the version's).
        projection_hidden, projection_dim: projector / predictor sizes.
        probe_runs, probe_epochs, probe_patience: the linear probe's seeded
            runs (the objective is their mean), epoch limit and patience.
        embed_batch_size: clips per encoder call while embedding.
        seed: seed of each trial's initialization, augmentations and data
            order (the same in every trial, so trials differ only by their
            hyperparameters), and of the probe.
        jit_compile, run_eagerly: passed to `model.compile` (`jit_compile`
            also to the probe's); eager steps skip compilation, which pays off
            only for budgets of a few steps (tests, debugging).
    """

    def __init__(
        self,
        data,
        version="v1",
        dim=None,
        dims=None,
        tune_fader=False,
        budget_steps=200,
        steps_per_epoch=None,
        batch_size=64,
        lr=None,
        tau=defaults.COMMON_DEFAULTS["tau"],
        memory_size=defaults.COMMON_DEFAULTS["memory_size"],
        projection_hidden=defaults.COMMON_DEFAULTS["projection_hidden"],
        projection_dim=defaults.COMMON_DEFAULTS["projection_dim"],
        probe_runs=3,
        probe_epochs=200,
        probe_patience=None,
        embed_batch_size=64,
        seed=0,
        jit_compile="auto",
        run_eagerly=False,
        name="byola",
        tunable=True,
    ):
        super().__init__(name=name, tunable=tunable)
        if version not in defaults.VERSIONS:
            raise ValueError(f"`version` must be 'v1' or 'v2'; got {version!r}.")
        for key, value in (("budget_steps", budget_steps), ("batch_size", batch_size), ("probe_runs", probe_runs)):
            if int(value) < 1:
                raise ValueError(f"`{key}` must be a positive integer; got {value!r}.")
        self.data = data
        self.version = version
        self.dim = dim
        self.dims = None if not dims else [int(d) for d in dims]
        self.tune_fader = bool(tune_fader)
        self.budget_steps = int(budget_steps)
        self.steps_per_epoch = int(steps_per_epoch or budget_steps)
        self.batch_size = int(batch_size)
        self.lr = lr
        self.tau = float(tau)
        self.memory_size = int(memory_size)
        self.projection_hidden = int(projection_hidden)
        self.projection_dim = int(projection_dim)
        self.probe_runs = int(probe_runs)
        self.probe_epochs = int(probe_epochs)
        self.probe_patience = int(probe_patience or defaults.VERSION_DEFAULTS[version]["probe_patience"])
        self.embed_batch_size = int(embed_batch_size)
        self.seed = int(seed)
        self.jit_compile = jit_compile
        self.run_eagerly = bool(run_eagerly)
        self.fit_history = []  # one record per `fit` in this process (metrics, resident MiB)
        self.fitted_models = []  # weak references: trained models must not stay alive

    # -- the search space -----------------------------------------------------------
    def declare(self, hp):
        """Declares the search space in `hp` and returns its current values."""
        paper = defaults.version_defaults(self.version)
        (freq_low, freq_high), (time_low, time_high) = paper["freq_scale"], paper["time_scale"]
        values = {
            "alpha": hp.Float("alpha", *SPACE["alpha"], default=paper["alpha"]),
            "freq_scale_low": hp.Float("freq_scale_low", *SPACE["freq_scale_low"], default=freq_low),
            "freq_scale_high": hp.Float("freq_scale_high", *SPACE["freq_scale_high"], default=freq_high),
            "time_scale_low": hp.Float("time_scale_low", *SPACE["time_scale_low"], default=time_low),
            "time_scale_high": hp.Float("time_scale_high", *SPACE["time_scale_high"], default=time_high),
            "virtual_crop_time": hp.Float(
                "virtual_crop_time", *SPACE["virtual_crop_time"], default=paper["virtual_crop_scale"][1]
            ),
        }
        if self.tune_fader:
            # v1 has no fader; its search starts from v2's gain.
            gain = paper["fader_gain"] or defaults.VERSION_DEFAULTS["v2"]["fader_gain"]
            values["fader_gain"] = hp.Float("fader_gain", *SPACE["fader_gain"], default=gain)
        if self.dims:
            default = self.dim if self.dim in self.dims else self.dims[0]
            values["dim"] = hp.Choice("dim", self.dims, default=default)
        return values

    def settings(self, hp=None):
        """The `byola-keras pretrain --config` settings of these hyperparameters.

        Only keys of `byola_keras.pretrain.DEFAULTS`; the schedule (epochs,
        batch size, steps) is left to the pretraining run.
        """
        values = self.declare(keras_tuner.HyperParameters())  # the defaults
        if hp is not None:
            values.update({k: v for k, v in hp.values.items() if k in values})
        dim = values.get("dim", self.dim)
        settings = {
            "version": self.version,
            "dim": None if dim is None else int(dim),
            "lr": self.lr,
            "tau": self.tau,
            "alpha": float(values["alpha"]),
            "memory_size": self.memory_size,
            "virtual_crop_scale": [1.0, float(values["virtual_crop_time"])],
            "freq_scale": [float(values["freq_scale_low"]), float(values["freq_scale_high"])],
            "time_scale": [float(values["time_scale_low"]), float(values["time_scale_high"])],
            "fader_gain": float(values["fader_gain"]) if "fader_gain" in values else "default",
        }
        resolved = pretrain_lib.resolve_settings(settings)
        settings["dim"], settings["lr"] = int(resolved["dim"]), float(resolved["lr"])
        return settings

    # -- build ------------------------------------------------------------------------
    def build(self, hp):
        self.declare(hp)
        settings = pretrain_lib.resolve_settings(self.settings(hp), seed=self.seed)
        seeding.set_random_seed(self.seed)
        if self.data is not None and self.data.prepared:
            mean, std, n_mels = self.data.mean, self.data.std, self.data.cache.n_mels
        else:  # only the search space is being read (or a chief that never trains)
            mean, std, n_mels = 0.0, 1.0, frontend.N_MELS
        return pretrain_lib.build_learner(
            settings,
            mean,
            std,
            input_shape=(n_mels, frontend.SEGMENT_FRAMES, 1),
            projection_hidden=self.projection_hidden,
            projection_dim=self.projection_dim,
            jit_compile=self.jit_compile,
            run_eagerly=self.run_eagerly,
        )

    # -- fit = pretrain + probe -----------------------------------------------------------
    def fit(self, hp, model, *args, epochs=None, initial_epoch=0, callbacks=None, verbose=0, **kwargs):
        """Pretrains `model` on the pool, then returns the probe's validation accuracy."""
        started = time.perf_counter()
        data = self.data.prepare()
        if epochs is None:
            epochs = max(1, math.ceil(self.budget_steps / self.steps_per_epoch))
        batch_size = min(self.batch_size, len(data.cache))
        dataset = data_lib.SegmentDataset(
            data.cache, batch_size=batch_size, seed=self.seed, steps_per_epoch=self.steps_per_epoch
        )
        dataset.epoch = int(initial_epoch)
        history = model.fit(
            dataset,
            epochs=int(epochs),
            initial_epoch=int(initial_epoch),
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,
        )
        logs = {k: float(v[-1]) for k, v in history.history.items() if v}
        loss = logs.get("loss", float("nan"))
        if not math.isfinite(loss):
            raise keras_tuner.errors.FailedTrialError(
                f"Pretraining diverged (loss {loss}) with hyperparameters {hp.values}."
            )
        pretrain_seconds = time.perf_counter() - started
        result = self.score(model, hp)
        result.update(
            pretrain_loss=loss,
            pretrain_steps=float((int(epochs) - int(initial_epoch)) * self.steps_per_epoch),
            pretrain_seconds=pretrain_seconds,
            trial_seconds=time.perf_counter() - started,
        )
        if "embedding_spread" in logs:
            result["embedding_spread"] = logs["embedding_spread"]
        del dataset, history
        self.fitted_models.append(weakref.ref(model))
        self.fit_history.append({"rss_mb": rss_mb(), **result})
        return result

    def baseline(self):
        """`score` of the untrained learner (the paper's settings, this search's seed).

        Every trial starts from these very weights, so a trial's gain over the
        baseline is what its pretraining added; gains within the probe's
        run-to-run spread (`probe_accuracy_std`) are noise.
        """
        keras.backend.clear_session()
        model = self.build(keras_tuner.HyperParameters())
        result = self.score(model)
        del model
        keras.backend.clear_session()
        return result

    def score(self, model, hp=None):
        """Linear-probe validation accuracy of `model.encoder` on the task.

        Embeds the task's train and valid clips (normalized with the pool's
        statistics) and trains the linear probe `probe_runs` times; returns
        `{"probe_accuracy": mean valid accuracy, "probe_accuracy_std": ...}`.
        """
        data = self.data.prepare()
        train_x, train_y = data.split("train")
        valid_x, valid_y = data.split("valid")
        encoder = model.encoder
        train_e = embed_log_mels(encoder, train_x, data.mean, data.std, self.embed_batch_size)
        valid_e = embed_log_mels(encoder, valid_x, data.mean, data.std, self.embed_batch_size)
        if not (np.all(np.isfinite(train_e)) and np.all(np.isfinite(valid_e))):
            values = None if hp is None else hp.values
            raise keras_tuner.errors.FailedTrialError(
                f"The encoder gave non-finite embeddings with hyperparameters {values}."
            )
        # The probe selects its epoch on valid and reports on "test": give it
        # valid as test too; the task's test split stays unseen by the search.
        probe = probes.linear_probe(
            (train_e, train_y),
            (valid_e, valid_y),
            (valid_e, valid_y),
            n_classes=len(data.task.classes),
            runs=self.probe_runs,
            seed=self.seed,
            patience=self.probe_patience,
            epochs=self.probe_epochs,
            jit_compile=self.jit_compile,
        )
        accuracies = probe["valid_accuracies"]
        return {
            OBJECTIVE_NAME: float(np.mean(accuracies)),
            "probe_accuracy_std": float(np.std(accuracies)),
        }


__all__ = ["BYOLAHyperModel", "OBJECTIVE", "OBJECTIVE_NAME", "SPACE", "SearchData"]
