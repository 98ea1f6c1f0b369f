"""FeatureExtractor (waveforms -> embeddings) and the HEAR 2021 API."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from byola_keras import hear
from byola_keras.embed import FeatureExtractor
from byola_keras.layers import LogMelSpectrogram
from byola_keras.models import AudioNTT2020, AudioNTT2022, WaveformEncoder
from tests.conftest import backend
from tests.test_weights import synthetic_state, write_torch_file

V1 = "AudioNTT2020-BYOLA-64x96d512.pth"
MEAN, STD = -5.4919195, 5.0389895
D = 64


def weight_file(shared, name):
    return str(shared / "reference" / "weights" / name)


@pytest.fixture(scope="module")
def v1_keras(tmp_path_factory):
    """A small v1 WaveformEncoder (d=64, random weights) saved as one `.keras` file."""
    keras.utils.set_random_seed(0)
    out = tmp_path_factory.mktemp("v1") / "encoder.keras"
    WaveformEncoder(AudioNTT2020(d=D), MEAN, STD).save(out)
    return str(out)


def direct(encoder, wave, htk=False):
    """The reference path: LogMelSpectrogram -> normalize -> encoder / frame_encoder."""
    lms = (LogMelSpectrogram(htk=htk)(np.asarray(wave, "float32")[None]) - MEAN) / STD
    return (
        ops.convert_to_numpy(encoder(lms))[0],
        ops.convert_to_numpy(encoder.frame_encoder(lms))[0],
    )


def chirp(seconds, rate=16000, seed=0):
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(t.shape[0])
    return (0.5 * np.sin(2 * np.pi * (200 + 300 * seed) * t) + 0.05 * noise).astype("float32")


def test_model_and_extractor_equal_the_direct_path(v1_keras):
    model = keras.saving.load_model(v1_keras)
    extractor = FeatureExtractor.from_pretrained_file(v1_keras)
    assert (model.mean, model.std, model.htk) == (MEAN, STD, False)
    wave = chirp(1.0)
    clip, frames, stamps = extractor(wave)
    assert clip.shape == (1, D) and frames.shape == (1, 12, D) and stamps.shape == (1, 12)
    want_clip, want_frames = direct(model.encoder, wave)
    np.testing.assert_allclose(clip[0], want_clip, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(frames[0], want_frames, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(model(wave[None]))[0], want_clip, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stamps[0], 0.035 + 0.08 * np.arange(12), atol=1e-6)
    np.testing.assert_allclose(model.timestamps(16000), stamps[0])
    with pytest.raises(ValueError, match="carries its own"):
        FeatureExtractor(model, MEAN, STD)


def test_official_weights_through_the_one_path(shared, reference):
    # The official README front-end (torchaudio, HTK) + README stats: official numbers.
    mean, std = (float(v) for v in reference["norm_stats_v1_readme"])
    extractor = FeatureExtractor.from_pretrained_file(weight_file(shared, V1), mean=mean, std=std, htk=True)
    got = extractor(ops.convert_to_tensor(reference["wave"])).clip
    expected = reference["wave_emb_v1_d512"]
    assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_variable_lengths_stereo_and_resampling(v1_keras):
    extractor = FeatureExtractor.from_pretrained_file(v1_keras, batch_size=2)
    rate = 44100
    mono = chirp(1.0, rate, 0)
    stereo_sc = np.stack([chirp(1.5, rate, 1), chirp(1.5, rate, 2)], axis=1)  # [samples, 2]
    stereo_cs = np.stack([chirp(0.5, rate, 3)] * 2, axis=0)  # [2, samples], equal channels
    short = chirp(0.03, rate, 4)  # shorter than one output frame: zero-padded
    clips = [mono, stereo_sc, stereo_cs, short, mono]
    clip, frames, stamps = extractor(clips, sample_rate=rate)
    assert clip.shape == (5, D) and isinstance(frames, list) and len(stamps) == 5
    expected_frames = [12, 18, 6, 1, 12]  # (samples at 16 kHz // 160 + 1) // 8
    assert [f.shape for f in frames] == [(n, D) for n in expected_frames]
    assert [s.shape for s in stamps] == [(n,) for n in expected_frames]
    np.testing.assert_allclose(clip[0], clip[4], rtol=1e-6)

    # Each clip alone (no batching) gives the same numbers; equal channels = mono.
    for index in (1, 2, 3):
        alone = extractor(clips[index], sample_rate=rate, channel_axis=None if index == 3 else 1 - (index - 1))
        np.testing.assert_allclose(alone.clip[0], clip[index], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        extractor(stereo_cs[0], sample_rate=rate).clip[0], clip[2], rtol=1e-5, atol=1e-5
    )

    # A [B, samples] batch (backend tensor) and a [B, samples, channels] batch.
    batch = np.stack([chirp(0.6, 16000, s) for s in range(3)])
    out = extractor(ops.convert_to_tensor(batch))
    assert out.frames.shape == (3, 7, D) and out.timestamps.shape == (3, 7)
    stereo_batch = extractor(np.stack([batch, batch], axis=-1))
    np.testing.assert_allclose(stereo_batch.clip, out.clip, rtol=1e-5, atol=1e-5)


def test_extractor_input_errors(v1_keras):
    extractor = FeatureExtractor.from_pretrained_file(v1_keras)
    with pytest.raises(ValueError, match="channel_axis"):
        extractor(np.zeros((16000, 2), "float32"))
    with pytest.raises(ValueError, match="channel_axis"):
        extractor([np.zeros((100, 100), "float32")])
    with pytest.raises(TypeError, match="int16"):
        extractor(np.zeros(16000, np.int16))
    with pytest.raises(ValueError, match=r"waveforms\[1\].*NaN"):
        extractor([np.zeros(16000, "float32"), np.full(16000, np.nan, "float32")])
    with pytest.raises(ValueError, match="empty"):
        extractor(np.zeros(0, "float32"))
    with pytest.raises(ValueError, match="sample_rate"):
        extractor(np.zeros(16000, "float32"), sample_rate=0)
    with pytest.raises(ValueError, match="mean"):
        FeatureExtractor(extractor.encoder, None, 1.0)
    with pytest.raises(ValueError, match="std"):
        WaveformEncoder(extractor.encoder, 0.0, -1.0)
    with pytest.raises(TypeError, match="BYOL-A encoder"):
        WaveformEncoder(keras.layers.Dense(3), 0.0, 1.0)


def test_v2_timestamps_and_pth_needs_stats(tmp_path):
    model = WaveformEncoder(AudioNTT2022(d=1088), MEAN, STD)
    clip, frames, stamps = model.embed(chirp(1.0))
    assert clip.shape == (1, 1088) and frames.shape == (1, 25, 1088)
    np.testing.assert_allclose(stamps[0], 0.015 + 0.04 * np.arange(25), atol=1e-6)
    assert model.min_samples == 513 and model.embed(chirp(0.02)).frames.shape == (1, 1, 1088)
    pth = write_torch_file(tmp_path / "v1.pth", synthetic_state(d=D))
    with pytest.raises(ValueError, match="v1.pth.*mean and std"):
        FeatureExtractor.from_pretrained_file(pth)
    with pytest.raises(ValueError, match="not a WaveformEncoder"):
        AudioNTT2020(d=D).save(tmp_path / "bare.keras")
        FeatureExtractor.from_pretrained_file(tmp_path / "bare.keras")
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        hear.load_model(tmp_path / "missing.keras")


def test_hear_api(v1_keras):
    model = hear.load_model(v1_keras)
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == D and model.timestamp_embedding_size == D
    assert isinstance(model.scene_embedding_size, int)
    if backend() == "torch":
        import torch

        assert isinstance(model, torch.nn.Module)
    elif backend() == "tensorflow":
        import tensorflow as tf

        assert isinstance(model, tf.Module)
    audio_np = np.stack([chirp(1.2, 16000, s) for s in range(3)])
    audio = ops.convert_to_tensor(audio_np)
    scene = hear.get_scene_embeddings(audio, model)
    frames, stamps = hear.get_timestamp_embeddings(audio, model)
    assert ops.is_tensor(scene) and ops.is_tensor(frames) and ops.is_tensor(stamps)
    assert tuple(scene.shape) == (3, D) and tuple(frames.shape) == (3, 15, D)
    assert tuple(stamps.shape) == (3, 15)
    assert all(keras.backend.standardize_dtype(t.dtype) == "float32" for t in (scene, frames, stamps))
    np.testing.assert_allclose(ops.convert_to_numpy(stamps)[1], 35.0 + 80.0 * np.arange(15), atol=1e-3)
    expected = FeatureExtractor.from_pretrained_file(v1_keras)(audio_np)
    np.testing.assert_allclose(ops.convert_to_numpy(scene), expected.clip, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(frames), expected.frames, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="n_sounds"):
        hear.get_scene_embeddings(audio[0], model)
    with pytest.raises(ValueError, match="model_file_path"):
        hear.load_model()


@pytest.mark.large
def test_hear_validator(v1_keras):
    """`hear-validator` accepts torch and TensorFlow modules; the JAX run checks via torch."""
    validator_backend = backend() if backend() in ("torch", "tensorflow") else "torch"
    env = dict(os.environ, KERAS_BACKEND=validator_backend, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-m", "hearvalidator.validate", "byola_keras.hear", "--model", v1_keras],
        capture_output=True, text=True, env=env, timeout=300,
    )
    output = result.stdout + result.stderr
    assert "No module named hearvalidator" not in output, (
        "install it with `pip install --no-deps hearvalidator` (it pins full tensorflow/torch)"
    )
    assert result.returncode == 0, output[-3000:]
    assert "Looks good!" in result.stdout
    assert "Received embedding of shape: " in result.stdout and str(D) in result.stdout


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize(
    "code",
    [
        "import byola_keras, sys; assert 'keras' not in sys.modules; import keras",
        "import keras, byola_keras",
        "import byola_keras, tensorflow, keras",
    ],
    ids=["byola_keras-then-keras", "keras-then-byola_keras", "via-tensorflow"],
)
def test_plain_load_model_after_import_byola_keras(v1_keras, code):
    """`import byola_keras` registers the classes whenever Keras gets imported, and not before."""
    check = (
        f"{code}\n"
        "import sys, numpy as np\n"
        f"model = keras.saving.load_model({v1_keras!r})\n"
        "print(type(model).__name__, tuple(model(np.zeros((1, 4000), 'float32')).shape))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"WaveformEncoder (1, {D})" in result.stdout
