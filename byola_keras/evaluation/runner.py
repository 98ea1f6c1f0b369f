"""`evaluate`: embeddings of each task, then the probes, then a summary table."""

import os
import sys

import numpy as np

from byola_keras import defaults
from byola_keras.evaluation import embedding as embedding_lib
from byola_keras.evaluation import probes
from byola_keras.evaluation import tasks as tasks_lib

PROBES = ("linear", "logreg")
PROBE_CHOICES = ("linear", "logreg", "both")


def _probe_list(probe):
    if probe not in PROBE_CHOICES:
        raise ValueError(f"`probe` must be one of {PROBE_CHOICES}; got {probe!r}.")
    return list(PROBES) if probe == "both" else [probe]


def _unique_names(tasks):
    seen = {}
    for task in tasks:
        base = task.name
        count = seen.get(base, 0) + 1
        seen[base] = count
        if count > 1:
            task.name = f"{base}-{count}"
    return tasks


def probe_patience(encoder):
    """Early-stopping patience of the linear probe for `encoder`: its BYOL-A
    version's (`byola_version`: 10 in v1, 20 in v2), 10 for other encoders.
    A `WaveformEncoder` answers for the encoder it holds."""
    inner = getattr(encoder, "encoder", None)
    version = getattr(encoder, "byola_version", None) or getattr(inner, "byola_version", "v1")
    return defaults.VERSION_DEFAULTS[version]["probe_patience"]


def evaluate(
    encoder,
    manifests,
    mean=None,
    std=None,
    runs=5,
    probe="linear",
    cache_dir=None,
    duration=None,
    seed=0,
    *,
    htk=False,
    patience=None,
    learning_rate=1e-3,
    epochs=200,
    probe_batch_size=200,
    batch_size=64,
    bucket_frames=None,
    logreg_grid=probes.DEFAULT_C_GRID,
    valid_fraction=0.1,
    verbose=False,
    train_stats=False,
):
    """Linear evaluation of a frozen encoder on labelled tasks.

    For each task manifest (`path,label,split` CSV): embed every clip (cached,
    see `embed_task`), carve a validation split out of train when there is
    none (`valid_fraction`, stratified, seeded with `seed`), then run the
    probe(s) on the embeddings standardized with train statistics.

    Args:
        encoder: a `WaveformEncoder`, or a Keras model `[B, 64, frames, 1]`
            normalized log-mel -> `[B, d]`.
        manifests: one manifest path or a list of them (or of `Task`s).
        mean, std: normalization statistics overriding the model's; None for
            the model's (a bare encoder: each task's train split).
        runs: seeded runs of the linear probe (logistic regression runs once).
        probe: `"linear"` (the papers' protocol), `"logreg"` or `"both"`.
        cache_dir: embedding cache folder; None for the default, False for none.
        duration: None (whole clips), seconds (crop / zero-pad) or `"mean"`.
        seed: seed of the first probe run and of the validation hold-out.
        htk: HTK mel filters instead of Slaney.
        patience: early-stopping patience; None: the encoder's version's
            (`byola_version` of the AudioNTT encoders: 10 in v1, 20 in v2;
            10 for other encoders).
        learning_rate, epochs, probe_batch_size: the linear probe's Adam
            learning rate, epoch limit and largest batch.
        batch_size: clips per encoder call while embedding.
        bucket_frames: pad frame counts up to multiples of this.
        logreg_grid: values of C tried by the logistic regression.
        valid_fraction: share of train held out when a task has no valid split.
        verbose: print progress to stderr.
        train_stats: statistics from each task's train split, even when the
            model has its own.

    Returns:
        A dict with `tasks` (per task: `manifest`, `n_train`, `n_valid`,
        `n_test`, `n_classes`, `embedding_dim`, `valid_from_train`, `mean`,
        `std`, `stats_source`, `embed_seconds`, `cached`, and one entry per
        probe with `mean`, `std`, `accuracies`, ...), `average` (the mean over
        tasks of each probe's mean accuracy) and `config`. Accuracies are
        fractions in [0, 1].
    """
    probe_names = _probe_list(probe)
    if patience is None:
        patience = probe_patience(encoder)
    if isinstance(manifests, (str, os.PathLike)):
        manifests = [manifests]
    manifests = list(manifests)
    if not manifests:
        raise ValueError("Give at least one task manifest.")
    if int(runs) < 1:
        raise ValueError(f"`runs` must be at least 1; got {runs}.")
    if (mean is None) != (std is None):
        raise ValueError("Give both `mean` and `std`, or neither (computed from each train split).")
    if "logreg" in probe_names:
        probes._sklearn()  # fail before embedding anything
    tasks = _unique_names(
        [m if isinstance(m, tasks_lib.Task) else tasks_lib.load_task(m) for m in manifests]
    )
    results = {}
    for task in tasks:
        emb = embedding_lib.embed_task(
            encoder,
            task,
            mean=mean,
            std=std,
            htk=htk,
            duration=duration,
            bucket_frames=bucket_frames,
            batch_size=batch_size,
            cache_dir=cache_dir,
            verbose=verbose,
            train_stats=train_stats,
        )
        index, carved = tasks_lib.task_split_indices(task, seed, valid_fraction)
        data = {s: (emb.embeddings[i], task.labels[i]) for s, i in index.items()}
        entry = {
            "manifest": task.manifest,
            "n_train": int(index["train"].size),
            "n_valid": int(index["valid"].size),
            "n_test": int(index["test"].size),
            "n_classes": task.n_classes,
            "embedding_dim": int(emb.embeddings.shape[1]),
            "valid_from_train": bool(carved),
            "mean": emb.mean,
            "std": emb.std,
            "stats_source": emb.stats_source,
            "embed_seconds": float(emb.embed_seconds),
            "cached": bool(emb.cached),
        }
        if "linear" in probe_names:
            entry["linear"] = probes.linear_probe(
                data["train"],
                data["valid"],
                data["test"],
                n_classes=task.n_classes,
                runs=int(runs),
                seed=seed,
                patience=patience,
                learning_rate=learning_rate,
                epochs=epochs,
                batch_size=probe_batch_size,
            )
        if "logreg" in probe_names:
            entry["logreg"] = probes.logreg_probe(
                data["train"], data["valid"], data["test"], grid=logreg_grid
            )
        results[task.name] = entry
        if verbose:
            scores = ", ".join(
                f"{p} {100 * entry[p]['mean']:.1f} +- {100 * entry[p]['std']:.1f}" for p in probe_names
            )
            print(f"{task.name}: {scores}", file=sys.stderr, flush=True)
    average = {p: float(np.mean([results[t][p]["mean"] for t in results])) for p in probe_names}
    config = {
        "runs": int(runs),
        "probe": probe,
        "duration": duration,
        "seed": seed,
        "htk": bool(htk),
        "patience": patience,
        "learning_rate": learning_rate,
        "epochs": epochs,
        "probe_batch_size": probe_batch_size,
        "bucket_frames": bucket_frames,
        "logreg_grid": [float(c) for c in logreg_grid],
        "valid_fraction": valid_fraction,
        "mean": None if mean is None else float(mean),
        "std": None if std is None else float(std),
    }
    return {"tasks": results, "average": average, "config": config}


def _cell(probe_result, show_std):
    text = f"{100 * probe_result['mean']:.1f}"
    if show_std and len(probe_result.get("accuracies", ())) > 1:
        text += f" +- {100 * probe_result['std']:.1f}"
    return text


def format_table(results):
    """A plain-text table of `evaluate`'s results: one row per task, then the average.

    Accuracies are shown in percent, with the std over runs when there are
    several runs.
    """
    tasks = results.get("tasks", {})
    probe_names = [p for p in PROBES if any(p in entry for entry in tasks.values())]
    headers = ["task", "classes", "train", "valid", "test"]
    headers += [f"{p} acc %" for p in probe_names] + ["embed s"]
    rows = []
    for name, entry in tasks.items():
        valid = f"{entry['n_valid']}*" if entry.get("valid_from_train") else str(entry["n_valid"])
        row = [name, str(entry["n_classes"]), str(entry["n_train"]), valid, str(entry["n_test"])]
        row += [_cell(entry[p], True) if p in entry else "-" for p in probe_names]
        seconds = f"{entry['embed_seconds']:.1f}"
        row.append(seconds + (" (cached)" if entry.get("cached") else ""))
        rows.append(row)
    average = results.get("average", {})
    rows.append(["average", "", "", "", ""] + [
        f"{100 * average[p]:.1f}" if p in average else "-" for p in probe_names
    ] + [""])
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(len(headers))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows[:-1]]
    out += [line(["-" * w for w in widths]), line(rows[-1])]
    if any(entry.get("valid_from_train") for entry in tasks.values()):
        out.append("* validation split held out from train")
    return "\n".join(out)
