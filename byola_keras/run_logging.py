"""What a training run logs as it goes: TensorBoard event files and a history JSON.

`byola-keras pretrain` writes, under its output folder:

    OUT/tensorboard/events.out.tfevents.*   scalars and images for TensorBoard
    OUT/history.json                        one entry per finished epoch

TensorBoard scalars, all against the optimizer step (epoch summaries at the
step where their epoch ended, so both kinds share one axis):
`step_loss`, `step_embedding_spread`, `step_learning_rate` (read at each
epoch end: BYOL-A's rate is constant),
`step_steps_per_second`, `step_samples_per_second` every `every` steps, and
`epoch_loss`, `epoch_embedding_spread`, `epoch_learning_rate`,
`epoch_samples_per_second`, `epoch_seconds` at every epoch end; the image
`augmentation` (a log-mel segment and its two augmented views) at the end of
the first epoch and every `image_every` epochs.

The step values are the losses of single steps, not Keras's running means of
the epoch: they are recovered from those means (`k m_k - (k - 1) m_(k-1)`), so
they equal the true step losses to float32 rounding, and a resumed run, whose
Keras means restart at the resume, logs the same values as an uninterrupted
one. The epoch values are the means over the whole epoch, also for an epoch
that was stopped and resumed in its middle: the sums so far travel in the
checkpoint (`run_meta["log_state"]`).

Resumed runs continue the same curves with each step once: on resume every
event file of the folder is cut back to the checkpoint's step (records are
appended in step order, so this is one `truncate` per file), and the new
segment starts with a `SessionLog.START` event at the next step, which makes a
TensorBoard that is already watching the folder drop what it loaded past it.

The event files are written with TensorBoard's own record format and protocol
buffers (`tensorboard.compat.proto`, no TensorFlow): Keras's
`keras.callbacks.TensorBoard` needs `tf.summary`, and TensorBoard's
`EventFileWriter` imports TensorFlow whenever it is installed (for
`tf.io.gfile`), which would load it into JAX and PyTorch runs. Writes are
synchronous and flushed at each logged step, so a SIGKILL loses nothing that
was logged before it; a failed write raises `byola_keras._files.WriteFailed`.
"""

import io
import math
import os
import socket
import struct
import time

import keras
import numpy as np

from byola_keras import _files
from byola_keras.backend import stateless

EVENTS_DIR = "tensorboard"
HISTORY_FILE = "history.json"
HISTORY_FORMAT = "byola-keras-history"
EVENT_FILE_PREFIX = "events.out.tfevents."
IMAGE_TAG = "augmentation"
_METRICS = ("loss", "embedding_spread")
_uid = [0]


def _protos():
    from tensorboard.compat.proto import event_pb2, summary_pb2

    return event_pb2, summary_pb2


def _masked_crc32c(data):
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    return masked_crc32c(data)


def tensorboard_available():
    """True if the `tensorboard` package (its protocol buffers) can be imported."""
    try:
        _protos()
        _masked_crc32c(b"")
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------
# Event files


class EventFile:
    """A new TensorBoard event file in `logdir`, written synchronously.

    Records are collected until `flush()`, which appends them to the file and
    hands them to the operating system. Any `OSError` becomes `WriteFailed`
    naming the file.
    """

    WHAT = "the TensorBoard log"

    def __init__(self, logdir):
        self.logdir = os.fspath(logdir)
        _uid[0] += 1
        name = (
            f"{EVENT_FILE_PREFIX}{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{_uid[0]}"
        )
        self.path = os.path.join(self.logdir, name)
        self._pending = []
        self._file = None
        try:
            os.makedirs(self.logdir, exist_ok=True)
            self._file = open(self.path, "ab")
        except OSError as error:
            raise _files.WriteFailed(self.path, self.WHAT, None, 0, error) from error
        event_pb2, _ = _protos()
        self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def _add(self, event):
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._pending.append(
            header + struct.pack("<I", _masked_crc32c(header)) + data
            + struct.pack("<I", _masked_crc32c(data))
        )

    def _summary(self, step, values):
        event_pb2, summary_pb2 = _protos()
        summary = summary_pb2.Summary(value=values)
        self._add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def scalars(self, step, values):
        """Adds `{tag: number}` at `step`."""
        _, summary_pb2 = _protos()
        self._summary(step, [
            summary_pb2.Summary.Value(tag=tag, simple_value=float(value)) for tag, value in values.items()
        ])

    def image(self, tag, png, height, width, channels, step):
        """Adds a PNG image (`channels` 1 grey, 3 RGB) at `step`."""
        _, summary_pb2 = _protos()
        image = summary_pb2.Summary.Image(
            height=int(height), width=int(width), colorspace=int(channels), encoded_image_string=png
        )
        self._summary(step, [summary_pb2.Summary.Value(tag=tag, image=image)])

    def summary(self, summary, step=0):
        """Adds a ready `Summary` protocol buffer (e.g. TensorBoard's hparams)."""
        event_pb2, _ = _protos()
        self._add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def session_start(self, step):
        """A `SessionLog.START` at `step`: TensorBoard drops what it loaded at
        `step` and later from this folder's older files."""
        event_pb2, _ = _protos()
        self._add(event_pb2.Event(
            wall_time=time.time(), step=int(step),
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
        ))

    def flush(self):
        if not self._pending or self._file is None:
            return
        data = b"".join(self._pending)
        self._pending = []
        try:
            injected = _files.injected_write_error(self.path)
            if injected is not None:
                raise injected
            self._file.write(data)
            self._file.flush()
        except OSError as error:
            raise _files.WriteFailed(self.path, self.WHAT, len(data), 0, error) from error

    def close(self):
        """Flushes what is pending (best effort: every logged step was flushed
        already) and closes the file."""
        if self._file is not None:
            try:
                self.flush()
            except _files.WriteFailed:
                pass
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


def event_files(logdir):
    """The event files directly in `logdir`, in TensorBoard's (name) order."""
    if not os.path.isdir(logdir):
        return []
    return [
        os.path.join(logdir, name) for name in sorted(os.listdir(logdir)) if name.startswith(EVENT_FILE_PREFIX)
    ]


def read_records(path):
    """`(start, end, event)` of each complete record of an event file, in order;
    stops at an incomplete or damaged record (a write cut short by a kill)."""
    event_pb2, _ = _protos()
    with open(path, "rb") as f:
        blob = f.read()
    records, at = [], 0
    while at + 12 <= len(blob):
        header = blob[at : at + 8]
        if struct.unpack("<I", blob[at + 8 : at + 12])[0] != _masked_crc32c(header):
            break
        length = struct.unpack("<Q", header)[0]
        end = at + 12 + length + 4
        if end > len(blob):
            break
        data = blob[at + 12 : at + 12 + length]
        if struct.unpack("<I", blob[end - 4 : end])[0] != _masked_crc32c(data):
            break
        records.append((at, end, event_pb2.Event.FromString(data)))
        at = end
    return records


def truncate_events(logdir, step):
    """Cuts every event file in `logdir` back to its events at steps <= `step`
    (and removes files left with no data); returns the number of events dropped."""
    dropped = 0
    for path in event_files(logdir):
        records = read_records(path)
        keep = 0
        for _, end, event in records:
            if event.step > step:
                break
            keep = end
        dropped += sum(1 for _, _, event in records if event.step > step)
        has_data = any(
            event.HasField("summary") for start, _, event in records if start < keep
        )
        try:
            if not has_data:
                os.remove(path)
            elif keep < os.path.getsize(path):
                os.truncate(path, keep)
        except OSError as error:
            raise _files.WriteFailed(path, EventFile.WHAT, keep, 0, error) from error
    return dropped


def read_scalars(logdir):
    """`{tag: [(step, value), ...]}` of the scalars of every event file in
    `logdir`, in file and step order (no purging: what is on disk). Reads both
    kinds: `simple_value` (this module) and scalar tensors (`tf.summary`)."""
    from tensorboard.util import tensor_util  # noqa: PLC0415

    out = {}
    for path in event_files(logdir):
        for _, _, event in read_records(path):
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    number = float(value.simple_value)
                elif kind == "tensor" and not value.tensor.tensor_shape.dim and value.tensor.dtype in _REAL_DTYPES:
                    number = float(tensor_util.make_ndarray(value.tensor))
                else:
                    continue
                out.setdefault(value.tag, []).append((int(event.step), number))
    return out


_REAL_DTYPES = (1, 2, 19)  # DT_FLOAT, DT_DOUBLE, DT_HALF


def read_images(logdir, tag=IMAGE_TAG):
    """`[(step, png bytes), ...]` of the images with `tag` in `logdir`."""
    out = []
    for path in event_files(logdir):
        for _, _, event in read_records(path):
            for value in event.summary.value:
                if value.tag == tag and value.WhichOneof("value") == "image":
                    out.append((int(event.step), bytes(value.image.encoded_image_string)))
    return out


# ----------------------------------------------------------------------------
# The augmentation image


def png(image):
    """PNG bytes of a uint8 `[height, width]` (grey) or `[height, width, 3]` array."""
    from PIL import Image  # noqa: PLC0415 (Pillow comes with tensorboard)

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _panel(log_mel, scale):
    """A `[n_mels, frames]` log-mel as uint8 grey, low frequencies at the bottom."""
    x = np.asarray(log_mel, np.float64)
    finite = np.isfinite(x)
    lo, hi = (x[finite].min(), x[finite].max()) if finite.any() else (0.0, 1.0)
    x = np.where(finite, (x - lo) / max(hi - lo, 1e-12), 0.0)
    x = np.round(255.0 * x[::-1]).astype(np.uint8)
    return np.repeat(np.repeat(x, scale, axis=0), scale, axis=1)


def augmentation_views(model, segment):
    """The augmentation module's training-mode views of `segment`
    (`[1, n_mels, frames, 1]`), drawn from copies of its state: the run's
    random generators and mixup memory bank are left as they are."""
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()
    augmentation = model.augmentation
    (view1, view2), _ = stateless.stateless_call(
        augmentation,
        [v.value for v in augmentation.trainable_variables],
        [v.value for v in augmentation.non_trainable_variables],
        keras.ops.convert_to_tensor(segment),
        training=True,
    )
    to_np = keras.ops.convert_to_numpy
    return to_np(view1)[0, :, :, 0], to_np(view2)[0, :, :, 0]


def augmentation_image(model, segment, scale=2, gap=4):
    """`(uint8 image, height, width)`: the segment, then its two views, side by side."""
    view1, view2 = augmentation_views(model, segment)
    panels = [_panel(p, scale) for p in (segment[0, :, :, 0], view1, view2)]
    height = panels[0].shape[0]
    spacer = np.full((height, gap), 255, np.uint8)
    image = np.concatenate([panels[0], spacer, panels[1], spacer, panels[2]], axis=1)
    return image, image.shape[0], image.shape[1]


# ----------------------------------------------------------------------------
# The callback of `byola-keras pretrain`


def _learning_rate(optimizer):
    try:
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    except (TypeError, ValueError, AttributeError):
        return float("nan")


class TrainingLog(keras.callbacks.Callback):
    """Logs a pretraining run to TensorBoard and `OUT/history.json`.

    Create one per run segment (one process) and pass it to every `fit` of the
    segment, before the checkpoint callback: it puts the sums of the current
    epoch in `run_meta["log_state"]`, which the checkpoint stores.

    Args:
        out: the run folder.
        steps_per_epoch: batches of a full epoch.
        batch_size: samples per step (for samples/s).
        run_meta: the dict the checkpoints store (settings under "settings").
        epoch, step: where this segment starts (0, 0 for a new run).
        log_state: `meta["log_state"]` of the checkpoint resumed from (or None).
        tensorboard: write TensorBoard events (else only the history JSON).
        every: scalars every this many steps (0: epoch summaries only).
        image_every: the augmentation image every this many epochs (0: none).
        segment: `[1, n_mels, frames, 1]` log-mel segment for the image.
        write: write anything at all (False on the processes other than 0 of
            a multi-process job: they only keep `run_meta["log_state"]`).

    An epoch stopped in its middle (by a signal) gets no epoch summary: the
    resumed run writes it when the epoch ends.
    """

    def __init__(
        self, out, steps_per_epoch, batch_size, run_meta, epoch=0, step=0, log_state=None,
        tensorboard=True, every=10, image_every=10, segment=None, write=True,
    ):
        super().__init__()
        self.out = os.fspath(out)
        self.logdir = os.path.join(self.out, EVENTS_DIR)
        self.history_path = os.path.join(self.out, HISTORY_FILE)
        self.steps_per_epoch = int(steps_per_epoch)
        self.batch_size = int(batch_size)
        self.run_meta = run_meta
        self.every = int(every or 0)
        self.image_every = int(image_every or 0)
        self.segment = segment
        self.global_step = int(epoch) * self.steps_per_epoch + int(step)
        state = log_state or {}
        if int(step) > 0 and state.get("epoch") == int(epoch):
            self._sums = {k: float(state["sums"].get(k, 0.0)) for k in _METRICS}
            self._count = int(state["steps"])
        else:
            self._sums, self._count = {k: 0.0 for k in _METRICS}, 0
        self._epoch = int(epoch)
        self.history = self._read_history(self.global_step)
        self.events = None
        self.write = bool(write)
        if tensorboard and self.write:
            truncate_events(self.logdir, self.global_step)
            self.events = EventFile(self.logdir)
            if self.global_step > 0:
                self.events.session_start(self.global_step + 1)
                self.events.flush()
        self._previous = {}
        self._k = 0

    def _read_history(self, keep_to_step):
        if keep_to_step == 0 or not os.path.isfile(self.history_path):
            return []
        try:
            history = _files.read_json(self.history_path)
            return [e for e in history.get("epochs", []) if int(e["step"]) <= keep_to_step]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []  # damaged: the epochs before the resume are lost, not the run

    # -- Keras hooks -------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._window = (time.perf_counter(), 0)
        # Read where the variables are in place (JAX detaches them during an epoch).
        self._lr = _learning_rate(self.model.optimizer)

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != self._epoch:  # a new epoch, not the resumed rest of one
            self._sums, self._count = {k: 0.0 for k in _METRICS}, 0
        self._epoch = epoch
        self._k = 0  # Keras resets its running means at every epoch start
        self._previous = {}
        self._segment_sums = dict(self._sums)
        self._segment_count = self._count
        self._epoch_started = time.perf_counter()
        self._epoch_steps = 0

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        self._k += 1
        self._epoch_steps += 1
        self.global_step += 1
        means = {k: float(logs[k]) for k in _METRICS if k in logs}
        # Running means of this `fit` epoch -> this step's values and the epoch's sums.
        values = {k: self._k * m - (self._k - 1) * self._previous.get(k, 0.0) for k, m in means.items()}
        self._previous = means
        self._count = self._segment_count + self._k
        self._sums = {k: self._segment_sums[k] + self._k * means.get(k, 0.0) for k in _METRICS}
        self.run_meta["log_state"] = {"epoch": self._epoch, "steps": self._count, "sums": dict(self._sums)}
        start, steps = self._window
        steps += 1
        self._window = (start, steps)
        if self.events is not None and self.every and self.global_step % self.every == 0:
            rate = steps / max(time.perf_counter() - start, 1e-9)
            scalars = {f"step_{k}": v for k, v in values.items()}
            scalars["step_learning_rate"] = self._lr
            scalars["step_steps_per_second"] = rate
            scalars["step_samples_per_second"] = rate * self.batch_size
            self.events.scalars(self.global_step, scalars)
            self.events.flush()
            self._window = (time.perf_counter(), 0)

    def on_epoch_end(self, epoch, logs=None):
        if self.global_step % self.steps_per_epoch:  # stopped mid-epoch: the rerun ends it
            return
        seconds = time.perf_counter() - self._epoch_started
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()
        self._lr = _learning_rate(self.model.optimizer)
        entry = {
            "epoch": epoch + 1,
            "step": self.global_step,
            **{k: self._sums[k] / max(self._count, 1) for k in _METRICS},
            "learning_rate": self._lr,
            "seconds": seconds,
            "samples_per_second": self._epoch_steps * self.batch_size / max(seconds, 1e-9),
            "time": time.time(),
        }
        self.history = [e for e in self.history if e["epoch"] < entry["epoch"]] + [entry]
        if self.write:
            self._write_history()
        if self.events is not None:
            self.events.scalars(
                self.global_step, {f"epoch_{k}": v for k, v in entry.items() if k not in ("epoch", "step", "time")}
            )
            number = epoch + 1
            if self.segment is not None and self.image_every and (number == 1 or number % self.image_every == 0):
                image, height, width = augmentation_image(self.model, self.segment)
                self.events.image(IMAGE_TAG, png(image), height, width, 1, self.global_step)
            self.events.flush()
        self._sums, self._count = {k: 0.0 for k in _METRICS}, 0
        self.run_meta["log_state"] = {"epoch": epoch + 1, "steps": 0, "sums": dict(self._sums)}
        self._epoch = epoch + 1
        self._window = (time.perf_counter(), 0)

    def _write_history(self):
        record = {
            "format": HISTORY_FORMAT,
            "version": 1,
            "steps_per_epoch": self.steps_per_epoch,
            "batch_size": self.batch_size,
            "settings": self.run_meta.get("settings"),
            "epochs": self.history,
        }
        _files.atomic_write_json(self.history_path, _finite(record), what="the training history")

    def close(self):
        if self.events is not None:
            self.events.close()


def _finite(value):
    """`value` with non-finite floats as None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def trial_logdir(root, trial_id, execution=0):
    """The folder of one KerasTuner trial's logs (KerasTuner's own layout)."""
    return os.path.join(root, str(trial_id), f"execution{execution}")


def remove_events(folder):
    """Removes every event file under `folder` (a trial that starts over)."""
    for parent, _, names in os.walk(folder):
        for name in names:
            if name.startswith(EVENT_FILE_PREFIX):
                os.remove(os.path.join(parent, name))


def hparams_summary(hparams, trial_id):
    """TensorBoard's HParams session-start summary of one trial."""
    from tensorboard.plugins.hparams import summary_v2  # noqa: PLC0415

    return summary_v2.hparams_pb(hparams, trial_id=str(trial_id))


def session_end_summary(success=True):
    """TensorBoard's HParams session-end summary (built from the plugin's
    protocol buffers: its `summary.session_end_pb` imports TensorFlow)."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2  # noqa: PLC0415

    _, summary_pb2 = _protos()
    status = api_pb2.STATUS_SUCCESS if success else api_pb2.STATUS_FAILURE
    data = plugin_data_pb2.HParamsPluginData(
        session_end_info=plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    )
    return summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(data))
    ])


class TrialTensorBoard(keras.callbacks.Callback):
    """What `keras.callbacks.TensorBoard`, set up by KerasTuner for a trial,
    writes on TensorFlow, written without TensorFlow: the trial's hyperparameters
    (HParams plugin) in `logdir`, and Keras's epoch logs as `epoch_<name>`
    scalars at step = epoch in `logdir/train`.

    Args:
        logdir: the trial's folder (`trial_logdir`).
        hparams: `{name: value}` of the trial.
        trial_id: the trial's id.
    """

    def __init__(self, logdir, hparams, trial_id):
        super().__init__()
        self.logdir = os.fspath(logdir)
        self.hparams = dict(hparams)
        self.trial_id = str(trial_id)
        self._train = None

    def on_train_begin(self, logs=None):
        session = EventFile(self.logdir)
        session.summary(hparams_summary(self.hparams, self.trial_id))
        session.close()
        self._train = EventFile(os.path.join(self.logdir, "train"))

    def on_epoch_end(self, epoch, logs=None):
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()
        scalars = {f"epoch_{k}": float(v) for k, v in (logs or {}).items()}
        scalars["epoch_learning_rate"] = _learning_rate(self.model.optimizer)
        self._train.scalars(epoch, scalars)
        self._train.flush()

    def on_train_end(self, logs=None):
        if self._train is not None:
            self._train.close()
            self._train = None


class HistoryCSV(keras.callbacks.CSVLogger):
    """`keras.callbacks.CSVLogger` whose failed writes raise `WriteFailed` naming the file."""

    WHAT = "the training history"

    def _failed(self, error):
        # An append: the size given is the file's so far.
        size = os.path.getsize(self.filename) if os.path.isfile(self.filename) else None
        return _files.WriteFailed(self.filename, self.WHAT, size, 0, error)

    def on_train_begin(self, logs=None):
        try:
            super().on_train_begin(logs)
        except OSError as error:
            raise self._failed(error) from error

    def on_epoch_end(self, epoch, logs=None):
        try:
            injected = _files.injected_write_error(self.filename)
            if injected is not None:
                raise injected
            super().on_epoch_end(epoch, logs)
        except OSError as error:
            raise self._failed(error) from error


__all__ = [
    "EventFile",
    "HistoryCSV",
    "TrainingLog",
    "TrialTensorBoard",
    "augmentation_image",
    "read_images",
    "read_scalars",
    "truncate_events",
]
