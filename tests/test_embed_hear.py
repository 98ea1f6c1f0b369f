"""FeatureExtractor (waveforms -> embeddings) and the HEAR 2021 API."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from byola_keras import hear, weights
from byola_keras.embed import FeatureExtractor
from byola_keras.layers import LogMelSpectrogram
from tests.conftest import backend

V1 = "AudioNTT2020-BYOLA-64x96d512.pth"
V2 = "SYNTHETIC-AudioNTT2022-64x96-d1280-h256-seed0.pth"
MEAN, STD = -5.4919195, 5.0389895


def weight_file(shared, name):
    return str(shared / "reference" / "weights" / name)


@pytest.fixture(scope="module")
def v1_keras(shared, tmp_path_factory):
    """The official d512 weights converted to `.keras` with norm_stats.json beside them."""
    out = tmp_path_factory.mktemp("v1") / "encoder.keras"
    weights.save_official_as_keras(weight_file(shared, V1), out, stats=(MEAN, STD))
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


def test_extractor_equals_direct_encoder_and_reference(reference, v1_keras):
    extractor = FeatureExtractor.from_pretrained_file(v1_keras)
    assert (extractor.mean, extractor.std, extractor.htk) == (MEAN, STD, False)
    wave = reference["wave"]
    clip, frames, stamps = extractor(wave)
    assert clip.shape == (1, 512) and frames.shape == (1, 12, 512) and stamps.shape == (1, 12)
    want_clip, want_frames = direct(extractor.encoder, wave)
    np.testing.assert_allclose(clip[0], want_clip, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(frames[0], want_frames, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stamps[0], 0.035 + 0.08 * np.arange(12), atol=1e-6)

    # The official README front-end (torchaudio, HTK) + README stats: official numbers.
    htk = FeatureExtractor(extractor.encoder, MEAN, STD, htk=True)
    got = htk(ops.convert_to_tensor(wave)).clip
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
    assert clip.shape == (5, 512) and isinstance(frames, list) and len(stamps) == 5
    expected_frames = [12, 18, 6, 1, 12]  # (samples at 16 kHz // 160 + 1) // 8
    assert [f.shape for f in frames] == [(n, 512) for n in expected_frames]
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
    assert out.frames.shape == (3, 7, 512) and out.timestamps.shape == (3, 7)
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


def test_v2_from_pth_timestamps(shared):
    extractor = FeatureExtractor.from_pretrained_file(weight_file(shared, V2), mean=MEAN, std=STD)
    clip, frames, stamps = extractor(chirp(1.0))
    assert clip.shape == (1, 1280) and frames.shape == (1, 25, 1280)
    np.testing.assert_allclose(stamps[0], 0.015 + 0.04 * np.arange(25), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="norm_stats.json.*mean"):
        FeatureExtractor.from_pretrained_file(weight_file(shared, V2))  # no stats beside it


def test_hear_api(v1_keras):
    model = hear.load_model(v1_keras)
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == 512 and model.timestamp_embedding_size == 512
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
    assert tuple(scene.shape) == (3, 512) and tuple(frames.shape) == (3, 15, 512)
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
    assert "Received embedding of shape: " in result.stdout and "512" in result.stdout
