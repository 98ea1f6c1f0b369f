"""`byola-keras pretrain`: BYOL-A pretraining from a folder of audio files.

    byola-keras pretrain [AUDIO_DIR] --epochs N --batch-size B --out DIR
        [--version v1|v2] [--dim D] [--backend jax] [--config BEST.json]
        [--checkpoint-every N] [--restart] [--data-parallel [--host-devices N]]
        [--tensorboard-every N] [--tensorboard-images N] [--no-tensorboard]

Decodes the folder into a sharded log-mel cache (growing it when files are
added), computes the pre-normalization statistics, and trains `BYOLA` with
`model.fit()`. The whole training state is one file per checkpoint,
`DIR/checkpoint-<step>.npz`: every variable of the learner (weights, EMA
target, BatchNorm statistics, mixup memory bank (its filled rows while it
fills), the states of all `SeedGenerator`s), the optimizer's variables, the
epoch and step, the run's settings and statistics. It is written after every epoch (and every N steps
with `--checkpoint-every N`) under a temporary name and renamed into place; the
previous one is kept until the next is complete, and a latest checkpoint that
cannot be read is skipped with a message. A re-run with the same `--out`
resumes from the newest one at the same epoch and step, with the same data
order, and ends bit-identical to a run that was never stopped. At the end
`DIR/encoder.keras` holds what downstream use needs: a `WaveformEncoder`
(waveform in; front-end, statistics and encoder in one file). As it trains,
the run writes TensorBoard logs to `DIR/tensorboard` and one entry per epoch
to `DIR/history.json` (`byola_keras.run_logging`; a resumed run continues the
same curves). A write that fails (full disk, read-only folder) ends the run
with `WriteFailed`, whose one-line message names the file and the intact
checkpoint to resume from.
Without AUDIO_DIR a small built-in synthetic corpus is used (no download).

Only one process at a time may use an output folder (`DIR/.lock`). A resume
with different architecture or augmentation settings stops with an error that
names them; `--restart` starts a new run in the same folder.

SIGTERM, SIGINT or SIGUSR1 end the run after the step in flight with a
checkpoint at that step and exit code 75 (`byola_keras.preemption`). Several
processes (`--coordinator HOST:PORT --num-processes N --process-id I`, Keras's
`KERAS_DISTRIBUTION_*` variables, `TF_CONFIG`, or `--detect-cluster`) train
one data-parallel run together on JAX or TensorFlow (`byola_keras.cluster`,
docs/distributed.md); process 0 writes the checkpoints and the encoder.
"""

import contextlib
import functools
import hashlib
import io
import json
import math
import os
import re
import signal
import sys
import time

import keras
import numpy as np

from byola_keras import _files
from byola_keras import cluster
from byola_keras import data as data_lib
from byola_keras import defaults as defaults_lib
from byola_keras import preemption
from byola_keras import run_logging
from byola_keras import seeding
from byola_keras.data.cache import BuildStopped
from byola_keras.models import BYOLA, AudioNTT2020, AudioNTT2022

ENCODER = "encoder.keras"
CONFIG = "config.json"
CHECKPOINT_FORMAT = "byola-keras-checkpoint"
CHECKPOINT_VERSION = 2  # 2: a memory bank that is not yet full is stored as its filled rows
READABLE_VERSIONS = (1, 2)
CHECKPOINTS_KEPT = 2
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{9})\.npz$")
# Test hook: `step:N` kills the process with SIGKILL after global step N;
# `write:PHASE[:K]` during the K-th checkpoint write (default 1st) at PHASE,
# one of "partial" (half the file written), "written" (complete, not yet
# renamed) or "renamed" (in place, the older one not yet removed).
KILL_ENV = "BYOLA_TEST_KILL_AT"
_WRITE_PHASES = ("partial", "written", "renamed")

_COMMON = defaults_lib.COMMON_DEFAULTS
# Keys a --config file may set (the tuner writes these), with their defaults
# (None / "default": the version's default from byola_keras.defaults).
DEFAULTS = {
    "version": "v1",
    "dim": None,
    "epochs": _COMMON["epochs"],
    "batch_size": _COMMON["batch_size"],
    "lr": None,
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
    "checkpoint_every": None,
}
# Settings a resumed run may change (anything else would change the run).
CHANGEABLE_ON_RESUME = ("epochs", "checkpoint_every")
# Command-line flag of each setting, for messages.
FLAGS = {key: "--" + key.replace("_", "-") for key in DEFAULTS}
_AUGMENTATION_KEYS = BYOLA._AUGMENTATION_KEYS


class PretrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ResumeMismatch(ValueError):
    """A resumed run was given settings that differ from the run's."""


# ----------------------------------------------------------------------------
# Settings


def _setting_error(key, message):
    return ValueError(f"Setting {key} ({FLAGS.get(key, key)}) {message}.")


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_settings(settings):
    """Raises `ValueError` naming the first setting whose value cannot be used."""
    for key in ("epochs", "batch_size", "dim", "memory_size"):
        if not _is_int(settings[key]) or settings[key] < 1:
            raise _setting_error(key, f"must be an integer >= 1; got {settings[key]!r}")
    for key in ("steps_per_epoch", "checkpoint_every"):
        value = settings[key]
        if value is not None and (not _is_int(value) or value < 1):
            raise _setting_error(key, f"must be an integer >= 1; got {value!r}")
    if not _is_int(settings["seed"]) or settings["seed"] < 0:
        raise _setting_error("seed", f"must be an integer >= 0; got {settings['seed']!r}")
    if not _is_number(settings["lr"]) or not (math.isfinite(settings["lr"]) and settings["lr"] > 0):
        raise _setting_error("lr", f"must be a number > 0; got {settings['lr']!r}")
    eps = settings["adam_epsilon"]
    if not _is_number(eps) or not (math.isfinite(eps) and eps > 0):
        raise _setting_error("adam_epsilon", f"must be a number > 0; got {eps!r}")
    if settings["batchnorm"] not in ("per_view", "joint"):
        raise _setting_error("batchnorm", f"must be per_view or joint; got {settings['batchnorm']!r}")
    if settings["init"] not in ("torch", "keras"):
        raise _setting_error("init", f"must be torch or keras; got {settings['init']!r}")
    if not _is_number(settings["tau"]) or not 0.0 <= settings["tau"] <= 1.0:
        raise _setting_error("tau", f"must be in [0, 1]; got {settings['tau']!r}")
    alpha = settings["alpha"]
    if alpha is not None and (not _is_number(alpha) or not 0.0 <= alpha <= 1.0):
        raise _setting_error("alpha", f"must be in [0, 1]; got {alpha!r}")
    gain = settings["fader_gain"]
    if gain not in ("default", None) and (not _is_number(gain) or not (math.isfinite(gain) and gain >= 0)):
        raise _setting_error("fader_gain", f"must be a number >= 0; got {gain!r}")
    for key, low in (("freq_scale", 0.0), ("time_scale", 0.0), ("virtual_crop_scale", 1.0)):
        pair = settings[key]
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(_is_number(v) and math.isfinite(v) for v in pair)
        ):
            raise _setting_error(key, f"must be two numbers; got {pair!r}")
        if key != "virtual_crop_scale" and not low < pair[0] <= pair[1]:
            raise _setting_error(key, f"must be 0 < LO <= HI; got {list(pair)}")
        if key == "virtual_crop_scale" and min(pair) < low:
            raise _setting_error(key, f"must be >= 1 in both axes; got {list(pair)}")
    if settings["mixed_precision"] not in (None, "mixed_bfloat16", "mixed_float16"):
        raise _setting_error(
            "mixed_precision", f"must be mixed_bfloat16 or mixed_float16; got {settings['mixed_precision']!r}"
        )
    for key in ("use_pre_norm", "use_mixup", "use_resize_crop", "use_post_norm"):
        if not isinstance(settings[key], bool):
            raise _setting_error(key, f"must be true or false; got {settings[key]!r}")


def resolve_settings(config=None, **overrides):
    """Merge defaults < config file < explicit overrides (None = not given)."""
    settings = dict(DEFAULTS)
    for source in (config or {}), overrides:
        unknown = set(source) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"Unknown pretraining setting(s): {sorted(unknown)}.")
        settings.update({k: v for k, v in source.items() if v is not None})
    if settings["version"] not in defaults_lib.VERSIONS:
        raise ValueError(f"version must be 'v1' or 'v2'; got {settings['version']!r}.")
    version_defaults = defaults_lib.version_defaults(settings["version"])
    for key in ("dim", "lr"):
        if settings[key] is None:
            settings[key] = version_defaults[key]
    for key in ("virtual_crop_scale", "freq_scale", "time_scale"):
        if isinstance(settings[key], tuple):
            settings[key] = list(settings[key])
    check_settings(settings)
    return settings


def _explicit(config, overrides):
    """The settings the user gave (config file, then flags), without defaults."""
    given = {}
    for source in (config or {}), overrides:
        unknown = set(source) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"Unknown pretraining setting(s): {sorted(unknown)}.")
        given.update({k: v for k, v in source.items() if v is not None})
    for key in ("virtual_crop_scale", "freq_scale", "time_scale"):
        if isinstance(given.get(key), tuple):
            given[key] = list(given[key])
    return given


def settings_for_resume(run_settings, given, out):
    """The run's settings with the allowed changes in `given` applied.

    Returns `(settings, changes)`; raises `ResumeMismatch` naming every setting
    in `given` that differs from the run's and may not change.
    """
    differing = [
        key for key, value in given.items()
        if key not in CHANGEABLE_ON_RESUME and _normalized(value) != _normalized(run_settings.get(key))
    ]
    if differing:
        lines = "; ".join(
            f"{FLAGS[k]}: the run has {run_settings.get(k)!r}, given {given[k]!r}" for k in differing
        )
        raise ResumeMismatch(
            f"The run in '{out}' was started with other settings ({lines}). "
            "Resume without them, or start a new run: add --restart (discards its checkpoints) "
            "or choose another --out."
        )
    settings = dict(run_settings)
    changes = {k: [run_settings.get(k), v] for k, v in given.items() if run_settings.get(k) != v}
    settings.update(given)
    check_settings(settings)
    return settings, changes


def _normalized(value):
    if isinstance(value, (list, tuple)):
        return [float(v) if _is_number(v) else v for v in value]
    if _is_number(value):
        return float(value)
    return value


# ----------------------------------------------------------------------------
# The learner


def build_encoder(version, dim, init="torch"):
    if version == "v1":
        return AudioNTT2020(d=int(dim), init=init)
    return AudioNTT2022(d=int(dim), init=init)


def build_learner(
    settings,
    mean,
    std,
    input_shape=(64, 96, 1),
    projection_hidden=_COMMON["projection_hidden"],
    projection_dim=_COMMON["projection_dim"],
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


def training_state_variables(model):
    """Every variable a resumed run needs, in a fixed order: the learner's
    (weights, EMA target, BatchNorm statistics, memory bank and every
    `SeedGenerator` state, which `model.save` leaves out) and the optimizer's."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    seen, variables = set(), []
    for variable in [*model.variables, *model.optimizer.variables]:
        if id(variable) not in seen:
            seen.add(id(variable))
            variables.append(variable)
    return variables


def _unfilled_bank(model):
    """`(variable, filled rows)` of the mixup memory bank while it is not yet
    full, else None. The bank fills from row 0 and its rows from `filled` on
    are still the zeros it was built with, so a checkpoint stores only the
    filled rows (a short run's checkpoint is up to 50 MB smaller)."""
    mixup = getattr(model.augmentation, "mixup", None)
    if mixup is None or not mixup.built:
        return None
    filled = int(keras.ops.convert_to_numpy(mixup.memory_filled))
    return (mixup.memory, filled) if filled < mixup.memory_size else None


def state_fingerprint(model):
    """Checksums of what a resumed run must carry over: optimizer step, EMA target
    weights, mixup memory bank and the random generators' states (printed on resume)."""
    to_np = keras.ops.convert_to_numpy
    mixup = model.augmentation.mixup
    seeds = [v for v in model.variables if v.name == "seed_generator_state"]
    return {
        "optimizer_iterations": int(to_np(model.optimizer.iterations)),
        "target_sum": float(sum(float(to_np(v).astype("float64").sum()) for v in model.target_variables)),
        "memory_sum": float(to_np(mixup.memory).astype("float64").sum()) if mixup.built else 0.0,
        "memory_filled": int(to_np(mixup.memory_filled)) if mixup.built else 0,
        "seed_states": [to_np(v).astype("int64").tolist() for v in seeds],
    }


def global_rng_state():
    """The backend's global random state, where Keras layers draw from it, else None.

    PyTorch's Dropout without a seed draws from torch's global generator (and
    its data loader takes a seed from it at every epoch); the JAX and
    TensorFlow layers draw only from their `SeedGenerator`s.
    """
    if keras.backend.backend() != "torch":
        return None
    import torch

    return torch.get_rng_state().numpy().tolist()


def set_global_rng_state(state):
    if state is not None and keras.backend.backend() == "torch":
        import torch

        torch.set_rng_state(torch.tensor(state, dtype=torch.uint8))


# ----------------------------------------------------------------------------
# Checkpoints: one .npz per checkpoint, switched into place by one rename


def _kill_point():
    spec = os.environ.get(KILL_ENV, "")
    kind, _, rest = spec.partition(":")
    return kind, rest


def _maybe_kill_at_step(global_step):
    kind, rest = _kill_point()
    if kind == "step" and rest == str(global_step):
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointWriter:
    """Writes and finds the checkpoints of an output folder."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.writes = 0

    def paths(self):
        """Checkpoint files, newest first."""
        found = []
        for name in os.listdir(self.out_dir):
            match = _CHECKPOINT_RE.match(name)
            if match:
                found.append((int(match.group(1)), os.path.join(self.out_dir, name)))
        return [path for _, path in sorted(found, reverse=True)]

    def write(self, model, meta):
        """Writes the training state of `model` with `meta` (a JSON-able dict)."""
        variables = training_state_variables(model)
        bank = _unfilled_bank(model)
        arrays = {}
        for i, v in enumerate(variables):
            value = keras.ops.convert_to_numpy(v)
            arrays[f"v{i:05d}"] = value[: bank[1]] if bank is not None and v is bank[0] else value
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            **meta,
            "variables": [[v.path, list(v.shape), str(v.dtype)] for v in variables],
            "global_rng": global_rng_state(),
        }
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.asarray(json.dumps(meta)), **arrays)
        payload = buffer.getvalue()
        digest = hashlib.sha256(payload).hexdigest()
        self.writes += 1
        kind, rest = _kill_point()
        phase, _, nth = rest.partition(":")
        kill_phase = phase if kind == "write" and self.writes == int(nth or 1) else None
        path = os.path.join(self.out_dir, f"checkpoint-{int(meta['global_step']):09d}.npz")

        def write(f):
            if kill_phase == "partial":
                f.write(payload[: len(payload) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            f.write(payload)
            f.write(digest.encode("ascii"))  # checked on load (after the .npz's own CRCs)
            if kill_phase == "written":
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)

        _files.atomic_write(path, write, what="the checkpoint", size=len(payload) + len(digest))
        if kill_phase == "renamed":
            os.kill(os.getpid(), signal.SIGKILL)
        for old in self.paths()[CHECKPOINTS_KEPT:]:
            os.remove(old)
        return path

    @staticmethod
    def read(path):
        """`(meta, arrays)` of a checkpoint file; `ValueError` if it is damaged."""
        try:
            with open(path, "rb") as f:
                blob = f.read()
            payload, digest = blob[:-64], blob[-64:].decode("ascii", "replace")
            if len(blob) < 64 or hashlib.sha256(payload).hexdigest() != digest:
                raise ValueError("its checksum does not match (incomplete or damaged)")
            with np.load(io.BytesIO(payload), allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = [data[f"v{i:05d}"] for i in range(len(meta["variables"]))]
        except ValueError:
            raise
        except Exception as err:  # a damaged zip or JSON: any reader error
            raise ValueError(f"{type(err).__name__}: {err}") from None
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") not in READABLE_VERSIONS:
            raise ValueError("not a byola-keras checkpoint of this version")
        return meta, arrays

    def latest(self):
        """`(path, meta, arrays)` of the newest readable checkpoint, or None.

        A newer checkpoint that cannot be read is skipped with a message.
        """
        paths = self.paths()
        for path in paths:
            try:
                meta, arrays = self.read(path)
            except ValueError as err:
                print(f"Checkpoint {path} cannot be read ({err}); trying the previous one.")
                continue
            return path, meta, arrays
        if paths:
            raise ValueError(
                f"None of the checkpoints in '{self.out_dir}' can be read; add --restart to start "
                "a new run there."
            )
        return None


def restore_training_state(model, meta, arrays):
    """Assigns a checkpoint's arrays to `model`'s variables (checked by path and
    shape); a memory bank stored as its filled rows gets zeros after them."""
    variables = training_state_variables(model)
    stored = meta["variables"]
    if len(stored) != len(variables):
        raise ValueError(
            f"The checkpoint holds {len(stored)} variables, the learner {len(variables)}."
        )
    mixup = getattr(model.augmentation, "mixup", None)
    bank = mixup.memory if mixup is not None and mixup.built else None
    for variable, (path, shape, _), value in zip(variables, stored, arrays):
        if variable is bank and value.shape[1:] == tuple(shape[1:]) and value.shape[0] < shape[0]:
            value = np.concatenate([value, np.zeros((shape[0] - value.shape[0], *shape[1:]), value.dtype)])
        if list(variable.shape) != list(shape) or tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"Checkpoint variable {path} has shape {shape}; the learner's {variable.path} "
                f"has {list(variable.shape)}."
            )
        variable.assign(value)


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


class TrainingCheckpoint(keras.callbacks.Callback):
    """Writes the whole training state after every epoch and every `every`
    steps, unless the loss went non-finite (the last good checkpoint stays).

    Args:
        writer: a `CheckpointWriter`.
        guard: the `NonFiniteLossGuard` of the same `fit`.
        steps_per_epoch: batches of a full epoch.
        meta: JSON-able dict stored with every checkpoint (settings, statistics).
        every: also write after every `every`-th global step (None: epochs only).
        dataset: a `SegmentDataset` whose `.epoch` is set at each epoch start.
        step_offset: the first batch of this `fit` is this step of its epoch
            (a resumed, partly done epoch).
        restore_rng: `(state, "epoch" | "batch")`: set the backend's global
            random state (`global_rng_state()`) at the first epoch start or the
            first batch start of this `fit`, where the uninterrupted run had it.
        stop: a `preemption.StopAtStep`: after a step where it says stop,
            the checkpoint is written at that step, training stops, and a
            partly done epoch gets no epoch-end checkpoint (`stopped_at`
            holds `(epoch, step)`).

    With `writer=None` (the processes other than 0 of a multi-process job)
    nothing is written; the steps are counted and the stop agreed all the same.
    """

    def __init__(
        self, writer, guard, steps_per_epoch, meta, every=None, dataset=None, step_offset=0, restore_rng=None,
        stop=None,
    ):
        super().__init__()
        self.stop = stop
        self.stopped_at = None
        self.restore_rng = restore_rng
        self.rng_at_epoch_end = None
        self.writer = writer
        self.guard = guard
        self.steps_per_epoch = int(steps_per_epoch)
        self.meta = meta
        self.every = every
        self.dataset = dataset
        self.step_offset = int(step_offset)
        self.last_written = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self.dataset is not None:
            self.dataset.epoch = epoch
        self._restore_rng("epoch")

    def on_train_batch_begin(self, batch, logs=None):
        self._restore_rng("batch")
        if self.stop is not None:
            self.stop.before_step(self._epoch * self.steps_per_epoch + self.step_offset + batch + 1)

    def _restore_rng(self, when):
        if self.restore_rng is not None and self.restore_rng[1] == when:
            set_global_rng_state(self.restore_rng[0])
            self.restore_rng = None

    def _write(self, epoch, step, logs):
        global_step = epoch * self.steps_per_epoch + step
        if self.guard.failed_at is not None or global_step == self.last_written:
            return
        self.last_written = global_step
        if self.writer is None:
            return
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()
        meta = {
            **self.meta,
            "epoch": epoch,
            "step": step,
            "global_step": global_step,
            "logs": {k: float(v) for k, v in (logs or {}).items()},
        }
        self.writer.write(self.model, meta)

    @property
    def stopped_mid_epoch(self):
        return self.stopped_at is not None and self.stopped_at[1] < self.steps_per_epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self.step_offset + batch + 1
        global_step = self._epoch * self.steps_per_epoch + step
        stopping = self.stop is not None and self.stop.after_step(global_step)
        if stopping:
            self.stopped_at = (self._epoch, step)
            self.model.stop_training = True
        if step < self.steps_per_epoch and (stopping or (self.every and global_step % self.every == 0)):
            self._write(self._epoch, step, logs)
        _maybe_kill_at_step(global_step)

    def on_epoch_end(self, epoch, logs=None):
        if self.stopped_mid_epoch:  # Keras ends a stopped epoch all the same
            return
        self.step_offset = 0
        self.rng_at_epoch_end = global_rng_state()
        self._write(epoch + 1, 0, logs)


class EpochCSVLogger(run_logging.HistoryCSV):
    """`HistoryCSV` without the row of an epoch stopped in its middle by a signal."""

    def __init__(self, filename, checkpoint):
        super().__init__(filename, append=True)
        self.checkpoint = checkpoint

    def on_epoch_end(self, epoch, logs=None):
        if not self.checkpoint.stopped_mid_epoch:
            super().on_epoch_end(epoch, logs)


def write_encoder(model, out):
    """Writes `out/encoder.keras`: a `WaveformEncoder` (log-mel front-end, the
    run's pre-normalization statistics and the trained encoder in one file).
    Returns its path."""
    from byola_keras.models import WaveformEncoder

    path = os.path.join(out, ENCODER)
    encoder = WaveformEncoder.from_learner(model)
    _files.atomic_save(path, encoder.save, what="the encoder")
    return path


# ----------------------------------------------------------------------------
# The run


def _tensorboard_available():
    if run_logging.tensorboard_available():
        return True
    print("TensorBoard logs are not written: the tensorboard package is not installed (pip install tensorboard).")
    return False


def _data_identity(cache):
    digest = hashlib.sha256()
    for path, length in zip(cache.paths, cache.lengths):
        digest.update(f"{path}\0{int(length)}\n".encode("utf-8", "surrogateescape"))
    return {"clips": len(cache), "sha256": digest.hexdigest()}


def _check_distribution(before, now, out):
    """A resume on another number of processes or devices: allowed on JAX (one
    SPMD program over the global batch: the same computation on any number of
    devices, only the order of sums may differ), refused on TensorFlow
    (BatchNorm statistics and random draws are per replica there)."""
    if not before or (before["processes"], before["replicas"]) == (now["processes"], now["replicas"]):
        return
    if "tensorflow" in (before["backend"], now["backend"]):
        raise ResumeMismatch(
            f"The run in '{out}' was trained on {before['replicas']} TensorFlow replica(s) "
            f"({before['processes']} process(es)); on {now['replicas']} its batch statistics and random "
            f"draws (per replica) would change. Resume on {before['replicas']} replica(s), or start a "
            "new run: add --restart or choose another --out."
        )
    print(
        f"Resumed run: trained on {before['processes']} process(es), {before['replicas']} device(s) so far, "
        f"now {now['processes']} and {now['replicas']} (the same global batch; sums may round differently)."
    )


def _newest_checkpoint(out):
    """Path of the newest checkpoint in `out`, or None (none, or the folder cannot be read)."""
    try:
        return next(iter(CheckpointWriter(out).paths()), None) if os.path.isdir(out) else None
    except OSError:
        return None


@contextlib.contextmanager
def _stdout_silenced():
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _remove_run(out):
    for name in os.listdir(out):
        if _CHECKPOINT_RE.match(name) or name in (CONFIG, "history.csv"):
            os.remove(os.path.join(out, name))


def pretrain(
    audio_dir=None,
    out="runs/byola",
    config=None,
    cache_dir=None,
    workers=None,
    verbose="auto",
    data_parallel=False,
    host_devices=None,
    restart=False,
    coordinator=None,
    num_processes=None,
    process_id=None,
    detect_cluster=False,
    tensorboard=True,
    tensorboard_every=10,
    tensorboard_images=10,
    **overrides,
):
    """Pretrain BYOL-A; returns a dict with the output paths and the history.

    Args:
        audio_dir: folder of audio files (searched recursively); `None` uses the
            built-in synthetic corpus.
        out: output folder (checkpoints, encoder); a re-run resumes exactly.
        config: dict of settings (e.g. loaded from the tuner's best JSON).
        cache_dir: where decoded log-mels are cached (default `OUT/cache`).
        workers: decoding threads.
        data_parallel: train over every device of the backend (JAX or
            TensorFlow; see `distribute.data_parallel_scope`); the batch size
            must be a multiple of the device count.
        host_devices: split the CPU into this many devices first (to try
            `data_parallel` without accelerators); must come before anything
            initialises the backend in this process.
        restart: discard the checkpoints in `out` and start a new run.
        coordinator, num_processes, process_id: this process's place in a
            multi-process job (`coordinator`: "HOST:PORT" of process 0, or
            every process's, comma-separated); without them Keras's
            `KERAS_DISTRIBUTION_*` variables or (TensorFlow) `TF_CONFIG` are
            read. See `byola_keras.cluster` and docs/distributed.md.
        detect_cluster: JAX: let `jax.distributed.initialize()` detect the
            processes (SLURM, Open MPI, Cloud TPU).
        tensorboard: write TensorBoard logs to `out/tensorboard` (see
            `byola_keras.run_logging`; `out/history.json` is always written).
        tensorboard_every: step scalars every this many steps (0: per epoch only).
        tensorboard_images: the augmentation image every this many epochs (0: none).
        **overrides: any key of `DEFAULTS`.

    A signal (SIGTERM, SIGINT, SIGUSR1) stops the run after the step in flight
    with a checkpoint there (`preemption.Stopped`).

    Raises:
        ValueError: a bad setting, or (`ResumeMismatch`) settings that differ
            from those of the run being resumed.
        byola_keras._files.FolderInUse: another process uses `out`.
        byola_keras._files.WriteFailed: a file could not be written (the
            message names it and says how to resume).
        PretrainingDiverged: the loss became NaN/inf.
        byola_keras.preemption.Stopped: stopped by a signal; run again to resume.
        byola_keras.cluster.LostProcess: a process of a multi-process job died.
    """
    if host_devices is not None and not data_parallel:
        raise ValueError("host_devices is only used with data_parallel=True.")
    given = _explicit(config, overrides)
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out '{out}' exists and is not a folder.")
    group = cluster.resolve(keras.backend.backend(), coordinator, num_processes, process_id, detect_cluster)
    if group is not None and host_devices is not None:
        raise ValueError("host_devices (--host-devices) is for one-process runs, not a multi-process job.")
    log_options = {"tensorboard": tensorboard, "every": tensorboard_every, "image_every": tensorboard_images}
    run = (audio_dir, out, given, cache_dir, workers, verbose, restart, log_options)
    try:
        if group is None:
            job = cluster.one_process(data_parallel, host_devices)
            with preemption.StopSignals() as signals, _files.FolderLock(out, "output folder"):
                return _pretrain_locked(*run, job, signals)
        # The engine first: the signal handlers installed after it are the ones that count.
        job = cluster.start(keras.backend.backend(), group)
        # Only process 0 prints; the others' errors still reach their caller.
        quiet = contextlib.nullcontext() if job.is_chief else _stdout_silenced()
        newest = functools.partial(_newest_checkpoint, out)
        with preemption.StopSignals() as signals, job.lost_process_guard(newest), cluster.output_lock(job, out), quiet:
            return _pretrain_locked(*run, job, signals)
    except _files.WriteFailed as error:
        error.hint = _how_to_resume(error, out)
        raise


def _how_to_resume(error, out):
    """The end of the message of a failed write: what to fix, and what a rerun does."""
    fix = _files.how_to_fix(error, os.path.dirname(os.path.abspath(error.path)))
    previous = _newest_checkpoint(out)
    if previous:
        step = int(_CHECKPOINT_RE.match(os.path.basename(previous)).group(1))
        return (
            f"The previous checkpoint '{previous}' (step {step}) is intact: {fix}, then run the "
            "same command again to resume from it."
        )
    return f"No checkpoint was written yet: {fix}, then run the same command again to start the run."


def _pretrain_locked(audio_dir, out, given, cache_dir, workers, verbose, restart, log_options, job, signals):
    if job.is_chief:
        _files.remove_temporaries(out)  # left by a run killed while writing
        if restart:
            _remove_run(out)
    job.barrier()
    writer = CheckpointWriter(out)
    found = writer.latest()
    if found is None:
        settings = resolve_settings(given)
        changes = {}
    else:
        checkpoint_path, meta, arrays = found
        settings, changes = settings_for_resume(meta["settings"], given, out)
    scope, replicas = job.scope(), job.replicas
    distribution = {"backend": keras.backend.backend(), **job.describe()}
    if found is not None:
        _check_distribution(meta.get("distribution"), distribution, out)
    if settings["batch_size"] % replicas:
        raise ValueError(
            f"batch_size {settings['batch_size']} is not a multiple of the {replicas} devices "
            "of data-parallel training."
        )
    if settings["mixed_precision"]:
        keras.config.set_dtype_policy(settings["mixed_precision"])
    seeding.set_random_seed(settings["seed"])

    try:
        cache = cluster.open_cache(job, audio_dir, cache_dir or os.path.join(out, "cache"), workers, signals)
    except BuildStopped as stopped:
        print(stopped)
        cache = None
    data_identity = _data_identity(cache) if cache is not None else {"clips": 0, "sha256": "0" * 64}
    # Every process shows the others what it found; all stop if one was signalled.
    if cluster.agree_to_start(
        job, -1 if found is None else meta["global_step"], data_identity, signals.requested or cache is None
    ):
        raise preemption.Stopped(signals.received, _newest_checkpoint(out), where="before training", written=False)
    if found is None:
        mean, std = data_lib.compute_norm_stats(cache)
        print(f"Pre-normalization statistics computed from {min(len(cache), 10000)} clips: "
              f"mean={mean:.4f} std={std:.4f}")
    else:
        if meta["data"] != data_identity:
            raise ResumeMismatch(
                f"The audio files changed since the run in '{out}' started ({meta['data']['clips']} "
                f"clips then, {len(cache)} now): resuming would change the data order. Restore "
                "them, or start a new run: add --restart or choose another --out."
            )
        mean, std = meta["mean"], meta["std"]
        print(f"Pre-normalization statistics kept from the checkpoint: mean={mean:.4f} std={std:.4f}")

    batch_size = settings["batch_size"]
    if batch_size > len(cache):
        usable = len(cache) - len(cache) % replicas
        if usable < 1:
            raise ValueError(f"{len(cache)} clips are fewer than the {replicas} data-parallel devices.")
        print(f"batch_size {batch_size} > {len(cache)} clips: using {usable}.")
        batch_size = usable
    if job.multi_process:
        print(
            f"Multi-process data-parallel training: {job.num_processes} processes, {replicas} device(s), "
            f"{batch_size // replicas} samples each (global batch {batch_size})."
        )
    elif job.data_parallel:
        print(f"Data-parallel training over {replicas} device(s), {batch_size // replicas} samples each.")
    dataset = data_lib.SegmentDataset(
        cache, batch_size=batch_size, seed=settings["seed"], steps_per_epoch=settings["steps_per_epoch"],
        shard=(job.process_id, job.num_processes) if job.multi_process else None,
    )
    steps_per_epoch = len(dataset)
    run_meta = {"settings": settings, "mean": mean, "std": std, "data": data_identity, "distribution": distribution}

    config_path = os.path.join(out, CONFIG)
    if not job.is_chief:
        changes = {}
    elif found is None:
        _files.atomic_write_json(
            config_path, {"settings": settings, "distribution": distribution, "resumes": []}, what="the run's settings"
        )
    else:
        run_config = {}
        if os.path.exists(config_path):
            with open(config_path) as f:
                run_config = json.load(f)
        run_config["settings"] = settings
        run_config.setdefault("resumes", []).append(
            {"epoch": meta["epoch"], "step": meta["step"], "changes": changes, "distribution": distribution}
        )
        _files.atomic_write_json(config_path, run_config, what="the run's settings")
        for key, (old, new) in changes.items():
            print(f"Resumed run: {FLAGS[key]} changed from {old} to {new} (logged in {config_path}).")

    with scope:  # data-parallel: build or load, train and save on every device
        model = build_learner(settings, mean, std)
        epoch, step = 0, 0
        if found is not None:
            restore_training_state(model, meta, arrays)
            epoch, step = meta["epoch"], meta["step"]
            print(f"Resuming from {checkpoint_path} at epoch {epoch + 1}, step {step}.")
            print("Resumed state: " + json.dumps(state_fingerprint(model)))
        rng = None if found is None else meta.get("global_rng")
        # Process 0 logs; the others' TrainingLog writes nothing.
        log = run_logging.TrainingLog(
            out, steps_per_epoch, batch_size, run_meta, epoch, step,
            log_state=None if found is None else meta.get("log_state"),
            tensorboard=log_options["tensorboard"] and job.is_chief and _tensorboard_available(),
            every=log_options["every"],
            # The image runs the augmentations on process 0 alone: one-process runs only.
            image_every=0 if job.multi_process else log_options["image_every"],
            segment=dataset.batch(0, epoch=0)[:1], write=job.is_chief,
        )
        try:
            history = _fit(
                model, dataset, settings, writer, run_meta, epoch, step, steps_per_epoch, out, verbose, rng,
                callbacks=[log], job=job, stop=preemption.StopAtStep(signals, job.any),
            )
        finally:
            log.close()
        if not job.multi_process:
            encoder_path = write_encoder(model, out)
    if job.multi_process:
        # Outside the scope: under TensorFlow's multi-worker strategy creating
        # variables is a collective, and only process 0 writes.
        encoder_path = write_encoder(model, out) if job.is_chief else os.path.join(out, ENCODER)
        job.barrier()  # no process reports success before the encoder exists
    print(f"Encoder: {encoder_path}")
    return {
        "encoder": encoder_path,
        "history_json": log.history_path,
        "tensorboard": log.logdir if log.events is not None else None,
        "checkpoint": writer.paths()[0] if writer.paths() else None,
        "history": history,
        "mean": mean,
        "std": std,
        "skipped_files": list(cache.skipped),
    }


def _fit(
    model, dataset, settings, writer, run_meta, epoch, step, steps_per_epoch, out, verbose, rng=None, callbacks=(),
    job=None, stop=None,
):
    """Trains from (epoch, step) to the end: the rest of a partly done epoch
    first (its own `fit`), then whole epochs. `rng` is the backend's global
    random state saved with the checkpoint (see `global_rng_state`);
    `callbacks` run before the checkpoint's (they may add to `run_meta`).
    `job` (a `cluster.Job`) feeds the data and writes only on process 0;
    `stop` (a `preemption.StopAtStep`) ends the run at a step with
    `preemption.Stopped`."""
    job = job or cluster.Job()
    epochs = settings["epochs"]
    history = {}
    if epoch >= epochs:
        return history
    guard = NonFiniteLossGuard()
    started = time.time()
    phases = []
    if step > 0:
        phases.append((epoch, epoch + 1, step))
        epoch += 1
    if epoch < epochs:
        phases.append((epoch, epochs, 0))
    restore_rng = None if rng is None else (rng, "batch" if step > 0 else "epoch")
    for first, last, offset in phases:
        data, fit_steps = job.fit_data(dataset, first, last, offset)
        checkpoint = TrainingCheckpoint(
            writer if job.is_chief else None, guard, steps_per_epoch, run_meta,
            every=settings["checkpoint_every"], dataset=dataset if offset == 0 else None, step_offset=offset,
            restore_rng=restore_rng, stop=stop,
        )
        fit_callbacks = [guard, *callbacks, checkpoint]
        if job.is_chief:
            fit_callbacks.append(EpochCSVLogger(os.path.join(out, "history.csv"), checkpoint))
        fit = model.fit(
            data,
            epochs=last,
            initial_epoch=first,
            steps_per_epoch=fit_steps,
            callbacks=fit_callbacks,
            verbose=verbose if job.is_chief else 0,
            shuffle=False,  # the dataset orders batches itself (resumable)
        )
        for key, values in fit.history.items():
            history.setdefault(key, []).extend(values)
        # The next `fit` continues where this one's last epoch ended.
        restore_rng = None if checkpoint.rng_at_epoch_end is None else (checkpoint.rng_at_epoch_end, "epoch")
        if guard.failed_at is not None:
            failed_epoch, failed_step = guard.failed_at
            raise PretrainingDiverged(
                f"The loss became NaN/inf at epoch {failed_epoch + 1}, step {failed_step + offset + 1}; "
                f"training stopped. The last good checkpoint in {out} is kept. Try a lower "
                "learning rate, check the normalization statistics, or use float32."
            )
        if checkpoint.stopped_at is not None:
            stopped_epoch, stopped_step = checkpoint.stopped_at
            if (stopped_epoch, stopped_step) != (epochs - 1, steps_per_epoch):  # else: done anyway
                job.barrier()  # process 0 has written the checkpoint
                raise preemption.Stopped(
                    stop.signals.received,
                    _newest_checkpoint(out),
                    where=f"after step {stopped_step} of epoch {stopped_epoch + 1}",
                )
    print(f"Trained to epoch {epochs} in {time.time() - started:.1f} s.")
    return history


def run_cli(args):
    """`byola-keras pretrain` from parsed arguments (see `byola_keras._cli_options`)."""
    overrides = {
        key: getattr(args, key)
        for key in (
            "epochs", "batch_size", "version", "dim", "lr", "steps_per_epoch", "seed", "mixed_precision",
            "alpha", "memory_size", "freq_scale", "time_scale", "virtual_crop_scale", "fader_gain",
            "checkpoint_every", "batchnorm", "init", "adam_epsilon",
        )
    }
    try:
        pretrain(
            args.audio_dir,
            out=args.out,
            config=getattr(args, "config_settings", None),
            cache_dir=args.cache_dir,
            workers=args.workers,
            verbose="auto" if args.verbose is None else args.verbose,
            data_parallel=args.data_parallel,
            host_devices=args.host_devices,
            restart=args.restart,
            coordinator=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            detect_cluster=args.detect_cluster,
            tensorboard=not args.no_tensorboard,
            tensorboard_every=args.tensorboard_every,
            tensorboard_images=args.tensorboard_images,
            **overrides,
        )
    except preemption.Stopped as stopped:
        print(stopped, flush=True)
        return preemption.EXIT_CODE
    except cluster.LostProcess as error:
        print(f"error: {error}", flush=True)
        sys.stderr.flush()
        # At once: a normal exit would wait at the engine's shutdown barrier
        # for the lost process (JAX: then abort with a stack dump).
        os._exit(cluster.EXIT_LOST_PROCESS)
    except PretrainingDiverged as error:
        print(f"error: {error}")
        return 3
    except (OSError, ValueError, _files.FolderInUse, data_lib.AudioDecodeError) as error:
        print(f"error: {error}")
        return 2
    return 0


__all__ = [
    "pretrain",
    "resolve_settings",
    "build_learner",
    "write_encoder",
    "PretrainingDiverged",
    "ResumeMismatch",
]
