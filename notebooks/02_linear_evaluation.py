# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Linear evaluation: official weights and your own encoder
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/byola-keras/byola-keras/blob/main/notebooks/02_linear_evaluation.ipynb)
#
# How good is a frozen representation? The BYOL-A papers answer with a linear
# evaluation: embed every clip of a labelled task with the frozen encoder,
# standardize the embeddings with train-split statistics, train a single
# softmax layer on them (Adam, lr 1e-3, early stopping on validation
# accuracy) and report the test accuracy averaged over seeded runs.
#
# This notebook evaluates
#
# - the **official BYOL-A weights** (`AudioNTT2020-BYOLA-64x96d512.pth`),
#   converted to Keras on the fly, and
# - **your own encoder**, from [notebook 1](01_pretrain.ipynb) (or a quickly
#   pretrained one),
#
# on a labelled task described by a CSV manifest `path,label,split`.

# %%
import importlib.util
import os

if importlib.util.find_spec("byola_keras") is None:  # e.g. on Colab
    print("Installing byola-keras ...")
    # %pip install -q "byola-keras[jax] @ git+https://github.com/byola-keras/byola-keras"

os.environ["KERAS_BACKEND"] = os.environ.get("KERAS_BACKEND", "jax")
# BYOLA_NOTEBOOK_SMALL=1: tiny data and few steps (a smoke run, as in CI).
SMALL = os.environ.get("BYOLA_NOTEBOOK_SMALL") == "1"

# %%
import csv
import glob

import keras
import matplotlib.pyplot as plt
import numpy as np
import soundfile as sf

import byola_keras
from byola_keras import data as byola_data
from byola_keras.evaluation import evaluate, format_table, load_task
from byola_keras.pretrain import pretrain
from byola_keras.weights import load_official

print(f"byola-keras {byola_keras.__version__}, Keras {keras.__version__}, backend {keras.backend.backend()}")
keras.utils.set_random_seed(0)

# %% [markdown]
# ## The official weights
#
# The official weights are licensed for evaluation only, so they are not
# shipped with byola-keras: download `AudioNTT2020-BYOLA-64x96d512.pth`
# yourself from the [official repository](https://github.com/nttcslab/byol-a)
# (`pretrained_weights/`) into this folder, e.g. on Colab:
#
# ```
# !wget -q https://github.com/nttcslab/byol-a/raw/master/pretrained_weights/AudioNTT2020-BYOLA-64x96d512.pth
# ```
#
# `load_official` reads the PyTorch file without PyTorch (a restricted reader
# that runs no code from the file) and returns a Keras `AudioNTT2020` encoder.

# %%
WEIGHTS_NAME = "AudioNTT2020-BYOLA-64x96d512.pth"
WEIGHTS = WEIGHTS_NAME
if not os.path.isfile(WEIGHTS) and os.environ.get("BYOLA_SHARED"):
    # CI: the project's reference copy (read in place, never copied).
    WEIGHTS = os.path.join(os.environ["BYOLA_SHARED"], "reference", "weights", WEIGHTS_NAME)

official = load_official(WEIGHTS) if os.path.isfile(WEIGHTS) else None
if official is None:
    print(f"{WEIGHTS_NAME} not found: download it (see above) to evaluate the official weights.")
else:
    print(f"official encoder: {type(official).__name__}(d={official.d}), "
          f"{official.count_params():,} parameters, from {WEIGHTS}")

# %% [markdown]
# ## Your encoder
#
# Notebook 1 leaves `runs/byola/encoder.keras` (a `WaveformEncoder`: front-end,
# statistics and encoder in one file)
# (on Colab, in the same runtime). Without them, a short pretraining run on the
# built-in synthetic corpus makes one here (`pretrain()`: the same `fit()` as
# notebook 1, in one call). Point `OWN` at any folder written by
# `byola-keras pretrain`.

# %%
OWN = "runs/byola"
if not os.path.isfile(os.path.join(OWN, "encoder.keras")):
    if SMALL:
        corpus = byola_data.make_default_corpus("byola_data/corpus-small", num_clips=24)
        run = dict(epochs=1, steps_per_epoch=2, batch_size=8, dim=256)
    else:
        corpus = byola_data.make_default_corpus()
        run = dict(epochs=30, batch_size=64, dim=2048)
    pretrain(corpus, out=OWN, verbose=2, **run)

own = keras.saving.load_model(os.path.join(OWN, "encoder.keras"))
print(f"own encoder: d={own.encoder.d}, {own.count_params():,} parameters; "
      f"statistics mean={own.mean:.3f} std={own.std:.3f}")

# %% [markdown]
# ## A labelled task
#
# A task is a CSV manifest with a `path,label,split` header (`split` is
# `train`, `valid` or `test`; relative paths are relative to the manifest's
# folder; other columns are ignored). For your own data, write one like it and
# list it in `MANIFESTS`.
#
# In the small setting a tiny task is made here: three classes of synthetic
# one-second sounds (a low harmonic tone, a high one, noise bursts). Otherwise
# the built-in corpus's manifest is used (eight kinds of synthetic sound), or
# every `manifest_*.csv` in `$BYOLA_TASKS` (e.g. the stand-in tasks of
# `shared/data/make_tasks.sh`).


# %%
def make_tiny_task(folder, per_split=None, seed=0, sample_rate=16000):
    """Writes a 3-class task of 1 s synthetic clips and returns its manifest path."""
    per_split = per_split or {"train": 6, "valid": 3, "test": 4}
    rng = np.random.default_rng(seed)
    t = np.arange(sample_rate) / sample_rate

    def sound(label):
        if label == "noise":
            wave = rng.standard_normal(t.size) * (np.sin(2 * np.pi * rng.uniform(2, 6) * t) > 0)
        else:
            f0 = rng.uniform(150, 300) if label == "low_tone" else rng.uniform(1200, 2400)
            wave = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.3)) / k for k in range(1, 5))
        return (0.5 * wave / np.abs(wave).max()).astype(np.float32)

    rows = []
    for label in ("low_tone", "high_tone", "noise"):
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        for split, count in per_split.items():
            for i in range(count):
                rel = f"{label}/{split}_{i}.wav"
                sf.write(os.path.join(folder, rel), sound(label), sample_rate)
                rows.append({"path": rel, "label": label, "split": split})
    manifest = os.path.join(folder, "manifest_tiny.csv")
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


if SMALL:
    MANIFESTS = [make_tiny_task("byola_data/tiny_task")]
elif os.environ.get("BYOLA_TASKS"):
    MANIFESTS = sorted(glob.glob(os.path.join(os.environ["BYOLA_TASKS"], "manifest_*.csv")))
else:
    MANIFESTS = [os.path.join(byola_data.make_default_corpus(), "manifest.csv")]

for manifest in MANIFESTS:
    task = load_task(manifest)
    counts = {split: int(np.sum(task.splits == split)) for split in ("train", "valid", "test")}
    print(f"{task.name}: {len(task)} clips, {task.n_classes} classes {task.classes}, {counts}")

# %% [markdown]
# ## Evaluate
#
# `evaluate` embeds each task once per encoder (cached on disk), then runs the
# linear probe `RUNS` times with different seeds. The official weights come
# without normalization statistics: as in the official evaluation, they are
# computed from each task's train split (`mean=None, std=None`). Your encoder
# uses the statistics it was pretrained with.

# %%
RUNS = 2 if SMALL else 5
results = {}
if official is not None:
    results["official d512"] = evaluate(official, MANIFESTS, mean=None, std=None, runs=RUNS)
results["own"] = evaluate(own, MANIFESTS, runs=RUNS)  # with the model's own statistics

for name, result in results.items():
    print(f"== {name}")
    print(format_table(result))
    print()

# %%
task_names = list(next(iter(results.values()))["tasks"])
fig, ax = plt.subplots(figsize=(max(5, 2.5 * len(task_names)), 3))
width = 0.8 / len(results)
for k, (name, result) in enumerate(results.items()):
    means = [100 * result["tasks"][t]["linear"]["mean"] for t in task_names]
    stds = [100 * result["tasks"][t]["linear"]["std"] for t in task_names]
    ax.bar(np.arange(len(task_names)) + k * width, means, width, yerr=stds, label=name, capsize=3)
ax.set_xticks(np.arange(len(task_names)) + width * (len(results) - 1) / 2, task_names)
ax.set(ylabel="test accuracy (%)", ylim=(0, 100), title=f"linear evaluation, {RUNS} runs")
ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
plt.show()

# %% [markdown]
# From the shell, the same evaluation:
#
# ```
# byola-keras evaluate AudioNTT2020-BYOLA-64x96d512.pth manifest_words.csv --runs 5
# byola-keras evaluate runs/byola manifest_words.csv --runs 5
# ```
#
# Next: [3. tune the augmentations](03_tuning.ipynb) with KerasTuner.
