"""Random log-mel segments of cached clips, batched for `model.fit`."""

import threading

import keras
import numpy as np

from byola_keras import frontend

# The log-mel of zero-padded audio: log(0 + eps).
PAD_VALUE = float(np.log(np.float32(frontend.LOG_EPS)))


class SegmentDataset(keras.utils.PyDataset):
    """Batches of random fixed-length log-mel segments, one per clip, for pretraining.

    Every epoch visits the clips of a `LogMelCache` in a random order and crops
    each at a random offset (BYOL-A: one 0.95 s = 96-frame segment per clip and
    epoch; the official code's crop never moved, this one does). Clips shorter
    than `segment_frames` are padded at the end with `log(LOG_EPS)`, the log-mel
    of zero-padded audio. The order and the offsets are a function of
    `(seed, epoch, batch index)` only, so batches can be read in any order, by
    any number of workers. `on_epoch_end()` moves to the next epoch (`.epoch`
    += 1); Keras's `fit` calls it at the end of every epoch and once before the
    first, so a training loop that must resume sets `.epoch` itself at each
    epoch start (as `byola-keras pretrain` does). `remainder(epoch, step)` is
    the rest of one epoch from batch `step` on: a run resumed in the middle of
    an epoch reads the batches the uninterrupted run read.

    Each batch is `x` only, float32 `[batch_size, n_mels, segment_frames, 1]`
    (no labels: BYOL-A is self-supervised). The remainder of an epoch is dropped
    so every batch has the same static shape. With `shard=(index, count)` a
    batch is this process's rows of the global batch, `[batch_size // count,
    ...]` from row `index * batch_size // count` on: order and offsets are
    computed for the global batch and only these rows are read, so the global
    batches are the same for any number of processes. Pass `shuffle=False` to
    `fit`: the dataset shuffles itself, and Keras's own batch shuffling would
    make the order depend on Python's global random state.

    Args:
        cache: a `LogMelCache` (anything with `len()`, `.lengths` and
            `.read(i, start, stop)`).
        batch_size: segments per batch.
        segment_frames: frames per segment (96 = 0.95 s at 16 kHz).
        seed: seed of the order and offsets (non-negative integer).
        steps_per_epoch: batches per epoch; default `len(cache) // batch_size`
            (at least 1; clips are repeated when the cache is smaller than a batch).
        shard: `(process index, process count)` of a multi-process run, or
            None: every row. `batch_size` stays the global batch and must be a
            multiple of the count.
        **kwargs: `workers`, `use_multiprocessing`, `max_queue_size` of
            `keras.utils.PyDataset`.

    Example:

    >>> cache = LogMelCache.build(find_audio_files("audio/"), "cache/")
    >>> data = SegmentDataset(cache, batch_size=256)
    >>> learner.fit(data, epochs=100, shuffle=False)
    """

    def __init__(
        self,
        cache,
        batch_size,
        segment_frames=frontend.SEGMENT_FRAMES,
        seed=0,
        steps_per_epoch=None,
        shard=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (("batch_size", batch_size), ("segment_frames", segment_frames)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
        if steps_per_epoch is not None and (
            isinstance(steps_per_epoch, bool)
            or not isinstance(steps_per_epoch, (int, np.integer))
            or steps_per_epoch < 1
        ):
            raise ValueError(
                f"`steps_per_epoch` must be None or a positive integer; got {steps_per_epoch!r}."
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer; got {seed!r}.")
        if len(cache) == 0:
            raise ValueError("The cache holds no clip: nothing to train on.")
        index, count = (0, 1) if shard is None else (int(shard[0]), int(shard[1]))
        if not (count >= 1 and 0 <= index < count and batch_size % count == 0):
            raise ValueError(
                f"`shard` must be (index, count) with 0 <= index < count and `batch_size` "
                f"a multiple of count; got shard={shard!r}, batch_size={batch_size}."
            )
        self.shard = None if shard is None else (index, count)
        self.local_batch_size = int(batch_size) // count
        self._rows = slice(index * self.local_batch_size, (index + 1) * self.local_batch_size)
        self.cache = cache
        self.batch_size = int(batch_size)
        self.segment_frames = int(segment_frames)
        self.seed = int(seed)
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.epoch = 0
        self._lengths = np.asarray(cache.lengths, np.int64)
        self._n_mels = int(getattr(cache, "n_mels", frontend.N_MELS))
        self._init_runtime()

    def _init_runtime(self):
        self._orders = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_orders", None)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    def __len__(self):
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        return max(1, len(self._lengths) // self.batch_size)

    def on_epoch_end(self):
        self.epoch += 1

    def _order(self, epoch, round_):
        """The clip order of one pass over the cache (an epoch may need several)."""
        key = (epoch, round_)
        with self._lock:
            order = self._orders.get(key)
        if order is None:
            rng = np.random.default_rng([self.seed, epoch, round_])
            order = rng.permutation(len(self._lengths))
            with self._lock:
                if len(self._orders) >= 4:
                    self._orders.clear()
                self._orders[key] = order
        return order

    def batch_clips(self, index, epoch=None):
        """Clip indices and frame offsets of batch `index` of `epoch` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = len(self._lengths)
        positions = index * self.batch_size + np.arange(self.batch_size)
        clips = np.empty(self.batch_size, np.int64)
        for round_ in np.unique(positions // n):
            mask = positions // n == round_
            clips[mask] = self._order(epoch, int(round_))[positions[mask] % n]
        rng = np.random.default_rng([self.seed, epoch, int(index), 1])
        spans = np.maximum(self._lengths[clips] - self.segment_frames, 0) + 1
        offsets = np.minimum((rng.random(self.batch_size) * spans).astype(np.int64), spans - 1)
        return clips, offsets

    def __getitem__(self, index):
        return self.batch(index)

    def batch(self, index, epoch=None):
        """Batch `index` of `epoch` (default: the current one)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"Batch index must be an integer; got {index!r}.")
        if not 0 <= index < len(self):
            raise IndexError(f"Batch index {index} out of range for {len(self)} batches per epoch.")
        clips, offsets = self.batch_clips(int(index), epoch)
        clips, offsets = clips[self._rows], offsets[self._rows]
        x = np.full((len(clips), self._n_mels, self.segment_frames, 1), PAD_VALUE, np.float32)
        for b, (clip, offset) in enumerate(zip(clips, offsets)):
            seg = self.cache.read(int(clip), int(offset), int(offset) + self.segment_frames)
            x[b, :, : seg.shape[1], 0] = seg
        return x

    def remainder(self, epoch, step):
        """Batches `step, step + 1, ...` of `epoch`: the rest of an epoch, as a dataset."""
        return _EpochRemainder(self, epoch, step)

    def as_numpy(self, num_batches=None):
        """The first `num_batches` batches of this epoch as one `[N, n_mels, frames, 1]` array."""
        count = len(self) if num_batches is None else min(int(num_batches), len(self))
        return np.concatenate([self[i] for i in range(count)], axis=0)


class _EpochRemainder(keras.utils.PyDataset):
    """Batches `step` to the end of one epoch of a `SegmentDataset`."""

    def __init__(self, dataset, epoch, step):
        super().__init__()
        if not 0 <= int(step) < len(dataset):
            raise ValueError(f"`step` must be in [0, {len(dataset)}); got {step!r}.")
        self.dataset = dataset
        self.epoch = int(epoch)
        self.step = int(step)

    def __len__(self):
        return len(self.dataset) - self.step

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"Batch index {index} out of range for {len(self)} batches.")
        return self.dataset.batch(self.step + int(index), self.epoch)
