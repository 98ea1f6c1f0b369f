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
# # 4. Export the encoder (SavedModel, ONNX) and serve it
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/byola-keras/byola-keras/blob/main/notebooks/04_export_and_serve.ipynb)
#
# A `WaveformEncoder` holds the whole pipeline in one Keras model: raw 16 kHz
# mono waveform in, log-mel front-end, normalization, encoder in inference
# mode, and out come the clip embedding and the frame embeddings. Keras's own
# exporter turns it into a SavedModel that
# [TF Serving](https://www.tensorflow.org/tfx/guide/serving) loads as it is
# (or an ONNX or LiteRT file), with one signature:
#
# `serving_default(waveform: float32 [batch, samples]) -> {embedding: [batch, d], frame_embeddings: [batch, frames, d]}`
#
# Keras exports from its TensorFlow backend; from JAX or PyTorch,
# `byola_keras.export.export` runs the export in a TensorFlow subprocess, so
# the encoder can be trained on any backend.

# %%
import importlib.util
import os

if importlib.util.find_spec("byola_keras") is None:  # e.g. on Colab (TensorFlow is preinstalled there)
    print("Installing byola-keras ...")
    # %pip install -q "byola-keras[jax] @ git+https://github.com/byola-keras/byola-keras"

os.environ["KERAS_BACKEND"] = os.environ.get("KERAS_BACKEND", "jax")
# BYOLA_NOTEBOOK_SMALL=1: tiny data and few steps (a smoke run, as in CI).
SMALL = os.environ.get("BYOLA_NOTEBOOK_SMALL") == "1"

# %%
import json

import keras
import numpy as np

import byola_keras
from byola_keras import data as byola_data
from byola_keras import export
from byola_keras.models import AudioNTT2020, WaveformEncoder

print(f"byola-keras {byola_keras.__version__}, Keras {keras.__version__}, backend {keras.backend.backend()}")
keras.utils.set_random_seed(0)

# %% [markdown]
# ## The encoder
#
# The encoder of [notebook 1](01_pretrain.ipynb) (`runs/byola/encoder.keras`,
# one file with the front-end and the statistics), or, when it is not there, a
# freshly initialized one with statistics from the built-in corpus: enough to
# see the export work (its embeddings mean nothing).

# %%
ENCODER = "runs/byola/encoder.keras"
model = keras.saving.load_model(ENCODER) if os.path.isfile(ENCODER) else None
if not isinstance(model, WaveformEncoder):
    print(f"No WaveformEncoder at {ENCODER} (run notebook 1): exporting an untrained encoder.")
    corpus = byola_data.make_default_corpus("byola_data/corpus-small" if SMALL else None,
                                            num_clips=24 if SMALL else 192)
    cache = byola_data.LogMelCache.build(byola_data.find_audio_files(corpus), "byola_data/cache")
    mean, std = byola_data.compute_norm_stats(cache)
    model = WaveformEncoder(AudioNTT2020(d=256 if SMALL else 2048), mean, std)
print(f"{model.encoder.name}: d={model.embedding_dim}, mean={model.mean:.3f}, std={model.std:.3f}")

# %% [markdown]
# ## Export
#
# TF Serving watches a base folder and loads its numbered versions, so the
# SavedModel goes to `serving/byola/1`. The export is reloaded and checked
# against the Keras model (several lengths, batch sizes and sounds) before
# `export` returns, and moved into place only then.

# %%
EXPORT_DIR = "serving/byola/1"
worst = export.export(model, EXPORT_DIR, overwrite=True)
print(f"signature 'serving_default' verified: max |SavedModel - Keras| on the probes {worst:.3g}")
print(sorted(os.listdir(EXPORT_DIR)))

# %% [markdown]
# ## Inspect and query it with TensorFlow
#
# Anything that loads SavedModels can use it; nothing of byola-keras or Keras
# is needed. From the shell, `saved_model_cli show --dir serving/byola/1 --all`
# prints the same signature.

# %%
import tensorflow as tf

loaded = tf.saved_model.load(EXPORT_DIR)
serve = loaded.signatures["serving_default"]
print("inputs: ", serve.structured_input_signature[1])
print("outputs:", serve.structured_outputs)

# %%
sample_rate = 16000
t = np.arange(sample_rate) / sample_rate  # 1 s
waveforms = np.stack([
    0.3 * np.sin(2 * np.pi * 440 * t),  # a tone
    0.1 * np.random.default_rng(0).standard_normal(t.size),  # noise
]).astype(np.float32)

outputs = serve(waveform=tf.constant(waveforms))
embedding = outputs["embedding"].numpy()
frame_embeddings = outputs["frame_embeddings"].numpy()
print("embedding:", embedding.shape, " frame_embeddings:", frame_embeddings.shape)

# The served graph computes what the Keras model computes.
clip, frames, timestamps = model.embed(waveforms)
print("max |SavedModel - Keras|:", float(np.max(np.abs(embedding - clip))))
np.testing.assert_allclose(embedding, clip, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(clip).max()))
print("frame times (s):", np.round(timestamps[0, :4], 3), "...")

# %% [markdown]
# ## ONNX
#
# The same signature as an ONNX file for onnxruntime (needs the `onnx` extra:
# `tf2onnx`, `onnx`, `onnxruntime`), checked against Keras in the same way.

# %%
if importlib.util.find_spec("tf2onnx") and importlib.util.find_spec("onnxruntime"):
    import onnxruntime

    export.export(model, "byola.onnx", format="onnx", overwrite=True)
    session = onnxruntime.InferenceSession("byola.onnx", providers=["CPUExecutionProvider"])
    onnx_embedding, onnx_frames = session.run(None, {"waveform": waveforms})
    print("max |ONNX - Keras|:", float(np.max(np.abs(onnx_embedding - clip))))
else:
    print("pip install 'byola-keras[onnx]' for the ONNX export")

# %% [markdown]
# ## Serve it with TF Serving
#
# With Docker, on a machine that has it (not on Colab), serve the base folder
# over REST (port 8501) and gRPC (port 8500):
#
# ```
# docker run --rm -p 8500:8500 -p 8501:8501 \
#     -v "$PWD/serving/byola:/models/byola" -e MODEL_NAME=byola \
#     tensorflow/serving
# ```
#
# (`tensorflow/serving:latest-gpu` with `--gpus all` on a GPU machine.) A new
# version, e.g. `serving/byola/2`, is picked up while the server runs.
#
# A REST request carries the waveforms as JSON, 16 kHz mono floats. In the
# row format each instance is one clip; clips of one request must have the
# same length (they form one `[batch, samples]` tensor). Here is a request
# with a 0.1 s clip, written to `request.json`:

# %%
short = waveforms[:1, :1600]
request = {"signature_name": "serving_default",
           "instances": [{"waveform": np.round(w, 6).tolist()} for w in short]}
with open("request.json", "w") as f:
    json.dump(request, f)
text = json.dumps(request)
print(f"{len(text):,} characters: {text[:160]} ... {text[-40:]}")

# %% [markdown]
# Send it and read the embeddings back:
#
# ```
# curl -s -X POST -d @request.json http://localhost:8501/v1/models/byola:predict
# ```
#
# ```python
# import requests
# reply = requests.post("http://localhost:8501/v1/models/byola:predict", json=request).json()
# embedding = np.array(reply["predictions"][0]["embedding"])          # [d]
# frames = np.array(reply["predictions"][0]["frame_embeddings"])      # [frames, d]
# ```
#
# The reply is `{"predictions": [{"embedding": [...], "frame_embeddings":
# [[...], ...]}, ...]}`, one entry per instance. The columnar format,
# `{"inputs": {"waveform": [[...], ...]}}`, returns `{"outputs": {...}}`.
#
# From the shell, the export in one line:
#
# ```
# byola-keras export runs/byola/encoder.keras --out serving/byola/1
# byola-keras export runs/byola/encoder.keras --out byola.onnx --format onnx
# ```
