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
# # 1. Pretrain BYOL-A with `model.fit()`
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/byola-keras/byola-keras/blob/main/notebooks/01_pretrain.ipynb)
#
# BYOL for Audio (BYOL-A) learns a general-purpose audio representation from
# unlabelled audio: two augmented views of the same log-mel segment must give
# the same embedding (BYOL's online network predicts its slowly moving target).
# This notebook
#
# 1. turns a folder of audio into log-mel spectrograms (the built-in synthetic
#    corpus by default, or your own folder, e.g. on Google Drive),
# 2. shows one clip and the two augmented views BYOL-A trains on,
# 3. pretrains the `BYOLA` learner with plain `model.fit()` and plots the loss,
# 4. saves the encoder and its normalization statistics for the next notebooks.
#
# It runs on JAX by default; any Keras 3 backend works (set `KERAS_BACKEND`
# before Keras is imported). On Colab, pick a GPU runtime for real data.

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
import time

import keras
import matplotlib.pyplot as plt
import numpy as np

import byola_keras
from byola_keras import data as byola_data
from byola_keras import frontend
from byola_keras.models import BYOLA, AudioNTT2020

print(f"byola-keras {byola_keras.__version__}, Keras {keras.__version__}, backend {keras.backend.backend()}")
keras.utils.set_random_seed(0)

# %% [markdown]
# ## Settings
#
# `AUDIO_DIR = None` uses the built-in synthetic corpus (eight kinds of sound,
# made on the spot, no download). To train on your own audio, point it at a
# folder; it is searched recursively for wav/flac/ogg/mp3/... files. On Colab,
# your Google Drive:
#
# ```python
# from google.colab import drive
# drive.mount("/content/drive")
# AUDIO_DIR = "/content/drive/MyDrive/my_audio"
# ```
#
# The paper pretrains the d=2048 encoder on AudioSet for 100 epochs with batch
# size 256; the full settings below are a first run on a small folder.

# %%
AUDIO_DIR = os.environ.get("BYOLA_AUDIO_DIR")  # None: the built-in corpus
OUT = "runs/byola"  # encoder.keras goes here

if SMALL:
    settings = dict(num_clips=24, batch_size=8, epochs=3, steps_per_epoch=2,
                    dim=256, projection_hidden=512, projection_dim=128, memory_size=64)
else:
    settings = dict(num_clips=192, batch_size=64, epochs=50, steps_per_epoch=None,
                    dim=2048, projection_hidden=4096, projection_dim=256, memory_size=2048)
settings

# %% [markdown]
# ## Audio -> log-mel cache
#
# Every file is decoded once (resampled to 16 kHz mono) into a 64-band log-mel
# spectrogram, stored on disk in shards. The pre-normalization
# statistics (one scalar mean and standard deviation over all log-mel values)
# come from this cache.

# %%
if AUDIO_DIR is None:
    AUDIO_DIR = byola_data.make_default_corpus(
        "byola_data/corpus-small" if SMALL else None, num_clips=settings["num_clips"]
    )
files = byola_data.find_audio_files(AUDIO_DIR)
print(f"{len(files)} audio files in {AUDIO_DIR}")

cache = byola_data.LogMelCache.build(files, os.path.join(OUT, "cache"))
mean, std = byola_data.compute_norm_stats(cache)
print(cache)
print(f"pre-normalization statistics: mean={mean:.3f}, std={std:.3f}")

# %%
clip = cache[0]  # [64 mel bins, frames], 10 ms per frame
seconds = clip.shape[1] * frontend.HOP_LENGTH / frontend.SAMPLE_RATE
fig, ax = plt.subplots(figsize=(9, 3))
image = ax.imshow(clip, origin="lower", aspect="auto", cmap="magma",
                  extent=[0, seconds, 0, clip.shape[0]])
ax.set(title=os.path.relpath(cache.paths[0], AUDIO_DIR), xlabel="time (s)", ylabel="mel bin")
fig.colorbar(image, ax=ax, label="log mel")
plt.show()

# %% [markdown]
# ## The learner and its two views
#
# `SegmentDataset` feeds `fit()` with batches of random 96-frame (0.95 s)
# segments, one per clip and epoch, shape `[batch, 64, 96, 1]`, no labels.
#
# `BYOLA` holds the augmentation module (Pre-Normalization -> mixup with a
# memory bank of past segments -> random resize crop -> Post-Normalization),
# the online encoder + projector + predictor, and the EMA target. Its
# augmentation layer, called in training mode, returns the two views of a
# batch; the BYOL loss asks the online prediction of one view to match the
# target projection of the other.

# %%
batch_size = min(settings["batch_size"], len(cache))
dataset = byola_data.SegmentDataset(
    cache, batch_size=batch_size, seed=0, steps_per_epoch=settings["steps_per_epoch"]
)

model = BYOLA(
    encoder=AudioNTT2020(d=settings["dim"]),
    version="v1",
    mean=mean,
    std=std,
    projection_hidden=settings["projection_hidden"],
    projection_dim=settings["projection_dim"],
    memory_size=settings["memory_size"],
    seed=0,
)
model.compile(optimizer=keras.optimizers.Adam(3e-4, epsilon=1e-8))  # PyTorch's epsilon, as the official code
print(f"encoder: {model.encoder.count_params():,} parameters, embedding size {settings['dim']}")

# %%
segments = dataset[0]
view1, view2 = model.augmentation(segments, training=True)
pictures = {
    "segment (log-mel)": segments[0, :, :, 0],
    "view 1": keras.ops.convert_to_numpy(view1)[0, :, :, 0],
    "view 2": keras.ops.convert_to_numpy(view2)[0, :, :, 0],
}
fig, axes = plt.subplots(1, 3, figsize=(13, 3))
for ax, (title, picture) in zip(axes, pictures.items()):
    image = ax.imshow(picture, origin="lower", aspect="auto", cmap="magma")
    ax.set(title=title, xlabel="frame", ylabel="mel bin")
    fig.colorbar(image, ax=ax)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Train with `fit()`
#
# Each step augments the batch twice, runs both views through the online and
# target networks and updates the target as an exponential moving average of
# the online weights. Besides the loss, `embedding_spread` watches for
# collapse: about 1 for well-spread projections, 0 if every clip maps to the
# same point.

# %%
started = time.time()
history = model.fit(dataset, epochs=settings["epochs"], shuffle=False, verbose=2)
print(f"trained {settings['epochs']} epochs in {time.time() - started:.1f} s")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3))
epochs = np.arange(1, len(history.history["loss"]) + 1)
ax1.plot(epochs, history.history["loss"], marker="o")
ax1.set(title="BYOL loss", xlabel="epoch", ylabel="loss")
ax2.plot(epochs, history.history["embedding_spread"], marker="o", color="tab:green")
ax2.set(title="embedding spread (collapse monitor)", xlabel="epoch",
        ylim=(0, max(1.2, 1.1 * max(history.history["embedding_spread"]))))
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Save the encoder with its front-end and statistics
#
# Only the encoder is needed downstream, together with the front-end and the
# normalization statistics its inputs were made with. `WaveformEncoder` holds
# all three in one `.keras` file: waveform in, embeddings out. It is what
# `byola-keras pretrain` writes, and what `byola-keras evaluate`,
# `byola-keras export`, the HEAR API and `FeatureExtractor` read.

# %%
from byola_keras.models import WaveformEncoder

os.makedirs(OUT, exist_ok=True)
encoder_path = os.path.join(OUT, "encoder.keras")
WaveformEncoder.from_learner(model).save(encoder_path)
print(sorted(os.listdir(OUT)))

# Reload (plain Keras, after `import byola_keras`) and embed: normalized
# log-mel segments through the encoder part, one vector per clip out...
loaded = keras.saving.load_model(encoder_path)
embeddings = loaded.encoder.predict((segments - mean) / std, verbose=0)
print("embeddings:", embeddings.shape)
np.testing.assert_allclose(
    embeddings, model.encoder.predict((segments - mean) / std, verbose=0), rtol=1e-4, atol=1e-4
)
# ... or 16 kHz waveforms through the whole model (front-end, statistics, encoder).
clip, frames, timestamps = loaded.embed(np.zeros(16000, np.float32) + 0.01 * np.random.randn(16000))
print("clip", clip.shape, "frames", frames.shape, "timestamps", np.round(timestamps[:3], 3))

# %% [markdown]
# The same run in one call (with checkpoints every epoch and resuming), or from
# the shell:
#
# ```python
# from byola_keras.pretrain import pretrain
# result = pretrain(AUDIO_DIR, out="runs/byola", epochs=100, batch_size=256, dim=2048)
# ```
#
# ```
# byola-keras pretrain /path/to/audio --out runs/byola --epochs 100 --batch-size 256
# ```
#
# Next: [2. linear evaluation](02_linear_evaluation.ipynb) of this encoder and
# of the official weights.
