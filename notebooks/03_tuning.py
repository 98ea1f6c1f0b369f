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
# # 3. Tune the augmentations with KerasTuner
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/byola-keras/byola-keras/blob/main/notebooks/03_tuning.ipynb)
#
# BYOL-A's augmentations have a few knobs: the mixup strength `alpha` and the
# ranges of the random resize crop (frequency and time stretch, and the width
# of the virtual crop canvas). The paper's values (alpha 0.4, scales 0.6-1.5,
# canvas 1.5x) were chosen for AudioSet; other audio may prefer others.
#
# Each KerasTuner trial pretrains BYOL-A for a short, fixed budget of steps on
# unlabelled audio (the *pool*) with one draw of these settings, then scores
# the encoder by a linear probe's accuracy on the validation split of a
# labelled task. The BYOL loss itself cannot rank trials: stronger
# augmentations make the pretext task harder, whatever the representation.
# The best settings are written as JSON for `byola-keras pretrain --config`.

# %%
import importlib.util
import os

if importlib.util.find_spec("byola_keras") is None:  # e.g. on Colab
    print("Installing byola-keras ...")
    # %pip install -q "byola-keras[jax,tuner] @ git+https://github.com/byola-keras/byola-keras"

os.environ["KERAS_BACKEND"] = os.environ.get("KERAS_BACKEND", "jax")
# BYOLA_NOTEBOOK_SMALL=1: tiny data and few steps (a smoke run, as in CI).
SMALL = os.environ.get("BYOLA_NOTEBOOK_SMALL") == "1"

# %%
import json

import keras
import keras_tuner
import matplotlib.pyplot as plt
import numpy as np
import soundfile as sf

import byola_keras
from byola_keras import data as byola_data
from byola_keras.pretrain import resolve_settings
from byola_keras.tuning import OBJECTIVE, BYOLAHyperModel, SearchData, best_record

print(f"byola-keras {byola_keras.__version__}, Keras {keras.__version__}, "
      f"KerasTuner {keras_tuner.__version__}, backend {keras.backend.backend()}")

# %% [markdown]
# ## Data and budget
#
# `POOL` is a folder of unlabelled audio (or a CSV manifest listing it) and
# `TASK` a labelled task manifest (`path,label,split`, see notebook 2): only its
# train and valid clips are read, the test split stays unseen. By default both
# come from the built-in synthetic corpus, drawn with different seeds so the
# task's clips are not in the pool (in the small setting the task is a tiny
# made-up one: two tones and noise); set `$BYOLA_POOL` / `$BYOLA_TASK` (or edit
# the cell) for your own data.
#
# A real search wants a few hundred steps per trial and 20+ trials (use a GPU
# runtime); the small setting runs two trials of two steps.

# %%
def make_tiny_task(folder, per_split=None, seed=0, sample_rate=16000):
    """Writes a 3-class task of 1 s synthetic clips and returns its manifest path."""
    per_split = per_split or {"train": 6, "valid": 3, "test": 3}
    rng = np.random.default_rng(seed)
    t = np.arange(sample_rate) / sample_rate
    rows = ["path,label,split"]
    for label in ("low_tone", "high_tone", "noise"):
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        for split, count in per_split.items():
            for i in range(count):
                if label == "noise":
                    wave = rng.standard_normal(t.size)
                else:
                    f0 = rng.uniform(150, 300) if label == "low_tone" else rng.uniform(1200, 2400)
                    wave = np.sin(2 * np.pi * f0 * t) + 0.3 * np.sin(4 * np.pi * f0 * t)
                rel = f"{label}/{split}_{i}.wav"
                sf.write(os.path.join(folder, rel), (0.3 * wave / np.abs(wave).max()).astype(np.float32),
                         sample_rate)
                rows.append(f"{rel},{label},{split}")
    manifest = os.path.join(folder, "manifest_tiny.csv")
    with open(manifest, "w") as f:
        f.write("\n".join(rows) + "\n")
    return manifest


OUT = "runs/search"
if SMALL:
    POOL = byola_data.make_default_corpus("byola_data/pool-small", num_clips=24)
    TASK = make_tiny_task("byola_data/tiny_task")
    # No XLA in the small setting: compiling costs more than two CPU steps.
    budget = dict(max_trials=2, budget_steps=2, batch_size=8, dim=256, projection_hidden=512,
                  projection_dim=128, memory_size=64, probe_runs=1, probe_epochs=20, jit_compile=False)
else:
    POOL = os.environ.get("BYOLA_POOL") or byola_data.make_default_corpus()
    TASK = os.environ.get("BYOLA_TASK") or os.path.join(
        byola_data.make_default_corpus(num_clips=192, seed=1), "manifest.csv")
    budget = dict(max_trials=20, budget_steps=300, batch_size=64, dim=2048, projection_hidden=4096,
                  projection_dim=256, memory_size=2048, probe_runs=3, probe_epochs=200, jit_compile="auto")

# Decoded once for the whole search (and cached in OUT). Task clips are cropped or
# padded to their mean length: one input shape, so the encoder is traced once.
data = SearchData(POOL, TASK, OUT, duration="mean").prepare()

# %% [markdown]
# ## The search space
#
# `BYOLAHyperModel` declares the search space and builds a compiled `BYOLA`
# learner per trial; its `fit()` pretrains for `budget_steps` steps and returns
# the probe accuracy, the objective `probe_accuracy` (maximized). Any
# KerasTuner tuner drives it: `RandomSearch` here, `BayesianOptimization` or
# `Hyperband` as well.

# %%
hypermodel = BYOLAHyperModel(
    data,
    version="v1",
    dim=budget["dim"],
    budget_steps=budget["budget_steps"],
    batch_size=budget["batch_size"],
    memory_size=budget["memory_size"],
    projection_hidden=budget["projection_hidden"],
    projection_dim=budget["projection_dim"],
    probe_runs=budget["probe_runs"],
    probe_epochs=budget["probe_epochs"],
    seed=0,
    jit_compile=budget["jit_compile"],
)
tuner = keras_tuner.RandomSearch(
    hypermodel,
    objective=OBJECTIVE,
    max_trials=budget["max_trials"],
    seed=1,
    directory=OUT,
    project_name="trials",
    overwrite=False,  # re-running this cell resumes the search
)
tuner.search_space_summary()

# %%
tuner.search(verbose=1)

# %% [markdown]
# ## The best settings

# %%
trials = tuner.oracle.get_best_trials(budget["max_trials"])
names = ["alpha", "freq_scale_low", "freq_scale_high", "time_scale_low", "time_scale_high",
         "virtual_crop_time"]
print(f"{'trial':>6} {'accuracy':>9} " + " ".join(f"{n:>17}" for n in names))
for trial in trials:
    values = trial.hyperparameters.values
    print(f"{trial.trial_id:>6} {trial.score:9.3f} " + " ".join(f"{values[n]:17.3f}" for n in names))

fig, axes = plt.subplots(1, 3, figsize=(12, 3), sharey=True)
for ax, (name, label) in zip(axes, [("alpha", "mixup alpha"), ("freq_scale_low", "freq scale, lower end"),
                                    ("time_scale_low", "time scale, lower end")]):
    ax.scatter([t.hyperparameters.values[name] for t in trials], [t.score for t in trials])
    ax.set(xlabel=label)
axes[0].set_ylabel("probe accuracy (valid)")
plt.tight_layout()
plt.show()

# %% [markdown]
# `hypermodel.settings(hp)` turns a trial's hyperparameters into the settings
# `byola-keras pretrain` understands; `best.json` keeps them under
# `"settings"`, with the score and a record of the search.

# %%
record = best_record(tuner, hypermodel)
best_path = os.path.join(OUT, "best.json")
with open(best_path, "w") as f:
    json.dump(record, f, indent=2)
print(json.dumps(record["settings"], indent=2))

# What `byola-keras pretrain --config` will train with (the schedule keeps its defaults).
with open(best_path) as f:
    config = json.load(f)["settings"]
final = resolve_settings(config)
print({k: final[k] for k in ("alpha", "virtual_crop_scale", "freq_scale", "time_scale", "dim", "lr")})

# %% [markdown]
# Pretrain with the best settings, from the shell:
#
# ```
# byola-keras pretrain /path/to/audio --config runs/search/best.json --epochs 100 --out runs/tuned
# ```
#
# The same search from the shell (resumable; a `chief` and several workers
# share it through KerasTuner's `KERASTUNER_*` environment variables):
#
# ```
# byola-keras tune --pool /path/to/audio --task manifest_words.csv \
#     --tuner bayesian --max-trials 30 --budget-steps 300 --out runs/search
# ```
#
# Next: [4. export and serve](04_export_and_serve.ipynb) the encoder.
