"""Streaming scalar mean / std over arrays or iterables of batches (host side)."""

import numpy as np


def _as_numpy(batch):
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if isinstance(batch, dict):
        raise ValueError("Expected log-mel batches, got a dict.")
    if hasattr(batch, "numpy"):
        batch = batch.numpy()
    elif not isinstance(batch, np.ndarray):
        from keras import ops

        batch = ops.convert_to_numpy(batch)
    return np.asarray(batch, dtype=np.float64)


def mean_std(data, steps=None):
    """Scalar mean and population std of all values in `data` (float64 sums)."""
    if hasattr(data, "shape") and hasattr(data, "dtype"):
        batches = [data]  # one array or tensor
    elif hasattr(data, "on_epoch_end") and hasattr(data, "__getitem__"):
        batches = (data[i] for i in range(len(data)))  # keras.utils.PyDataset
    else:
        batches = data  # tf.data.Dataset, generator, list of batches
    count = 0
    total = 0.0
    total_sq = 0.0
    for i, batch in enumerate(batches):
        if steps is not None and i >= steps:
            break
        arr = _as_numpy(batch)
        arr = arr[np.isfinite(arr)]
        count += arr.size
        total += arr.sum()
        total_sq += np.square(arr).sum()
    if count == 0:
        raise ValueError("Cannot compute statistics: the data held no finite values.")
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    return float(mean), float(np.sqrt(var))
