"""Labelled downstream tasks: a CSV manifest `path,label,split` read into arrays.

Splits are `train`, `valid` and `test`; relative paths resolve against the
manifest's folder. A task without a `valid` split gets one carved out of
`train` (10 %, stratified by label, seeded), as the linear evaluation needs a
validation set for early stopping.
"""

import dataclasses
import os

import numpy as np

from byola_keras import data
from byola_keras import frontend

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass
class Task:
    """A labelled task read from one manifest.

    Attributes:
        name: short name (`manifest_words.csv` -> `"words"`).
        manifest: absolute path of the manifest file.
        paths: absolute audio paths, in manifest order.
        labels: `int32 [N]` class indices into `classes`.
        classes: sorted label strings.
        splits: `[N]` array of `"train"`, `"valid"` or `"test"`.
    """

    name: str
    manifest: str
    paths: list
    labels: np.ndarray
    classes: list
    splits: np.ndarray

    @property
    def n_classes(self):
        return len(self.classes)

    def indices(self, split):
        """Row indices of one split, in manifest order."""
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
        return np.flatnonzero(self.splits == split)

    def __len__(self):
        return len(self.paths)


def task_name(manifest):
    """`.../manifest_words.csv` -> `words`; `.../esc50/manifest.csv` -> `esc50`."""
    manifest = os.path.abspath(os.fspath(manifest))
    stem = os.path.splitext(os.path.basename(manifest))[0]
    if stem.startswith("manifest_") and len(stem) > len("manifest_"):
        return stem[len("manifest_") :]
    if stem == "manifest":
        return os.path.basename(os.path.dirname(manifest)) or stem
    return stem


def load_task(manifest, name=None):
    """Read a task manifest (`path,label,split` CSV) into a `Task`.

    Args:
        manifest: path of the CSV file; other columns are ignored.
        name: task name (default: from the file name, see `task_name`).

    Raises:
        FileNotFoundError: the manifest or a listed file does not exist.
        ValueError: missing columns, an unknown split, no train or no test
            rows, or a single class; the message names the file.
    """
    manifest = os.path.abspath(os.fspath(manifest))
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"Task manifest '{manifest}' does not exist.")
    rows = data.read_manifest(manifest)
    splits = np.asarray([row["split"] for row in rows])
    for needed in ("train", "test"):
        if not np.any(splits == needed):
            raise ValueError(f"Task manifest '{manifest}' has no '{needed}' clips.")
    label_strings = [str(row["label"]) for row in rows]
    classes = sorted(set(label_strings))
    if len(classes) < 2:
        raise ValueError(f"Task manifest '{manifest}' has a single label {classes}; need 2 or more.")
    index = {label: i for i, label in enumerate(classes)}
    return Task(
        name=name or task_name(manifest),
        manifest=manifest,
        paths=[os.fspath(row["path"]) for row in rows],
        labels=np.asarray([index[s] for s in label_strings], dtype="int32"),
        classes=classes,
        splits=splits,
    )


def split_valid(labels, fraction=0.1, seed=0):
    """Stratified, seeded hold-out: `(train_positions, valid_positions)`.

    Takes `round(fraction * n)` (at least 1) items, spread over the classes in
    proportion to their counts (largest remainders), each class's items drawn
    at random with `seed`. Positions index into `labels` and come back sorted.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if n < 2:
        raise ValueError(f"Cannot hold out a validation set from {n} training clip(s).")
    n_valid = min(max(1, int(round(fraction * n))), n - 1)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (n_valid / n)
    take = np.floor(quota).astype(int)
    remainder = quota - take
    order = np.lexsort((np.arange(len(classes)), -remainder))
    for i in order[: n_valid - take.sum()]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    valid = []
    for cls, k in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        valid.extend(rng.permutation(members)[:k].tolist())
    valid = np.sort(np.asarray(valid, dtype=int))
    train = np.setdiff1d(np.arange(n), valid)
    return train, valid


def task_split_indices(task, seed=0, valid_fraction=0.1):
    """`{"train", "valid", "test"}` row indices of a task, and whether valid was carved.

    Without valid rows, `valid_fraction` of train is held out with `split_valid`.
    """
    train = task.indices("train")
    valid = task.indices("valid")
    carved = valid.size == 0
    if carved:
        keep, held = split_valid(task.labels[train], valid_fraction, seed)
        train, valid = train[keep], train[held]
    return {"train": train, "valid": valid, "test": task.indices("test")}, carved


def load_audio(path, sample_rate=frontend.SAMPLE_RATE):
    """The whole clip as mono float32 at `sample_rate` (`byola_keras.data.load_audio`)."""
    return np.asarray(data.load_audio(path, sample_rate=sample_rate), dtype="float32")
