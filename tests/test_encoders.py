"""AudioNTT encoders: exact parameter counts, variable lengths, frame outputs, saving."""

import keras
import numpy as np
import pytest

from byola_keras.models import AudioNTT2020, AudioNTT2022
from tests.testing import save_and_load, to_numpy


def trainable_params(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize(
    "make, count",
    [
        (lambda: AudioNTT2020(d=512), 600_192),
        (lambda: AudioNTT2020(d=1024), 1_649_792),
        (lambda: AudioNTT2020(d=2048), 5_321_856),
        (lambda: AudioNTT2022(), 6_333_376),
    ],
)
def test_parameter_counts_match_the_papers(make, count):
    assert trainable_params(make()) == count


@pytest.mark.parametrize("frames, pooled", [(96, 12), (101, 12), (17, 2), (8, 1), (250, 31)])
def test_v1_any_number_of_frames(frames, pooled):
    encoder = AudioNTT2020(d=32, n_mels=16)
    x = np.random.default_rng(0).normal(size=(2, 16, frames, 1)).astype("float32")
    assert tuple(encoder(x).shape) == (2, 32)
    frame_out = to_numpy(encoder.frame_encoder(x))
    assert frame_out.shape == (2, pooled, 32)
    assert encoder.frames_per_input(frames) == pooled
    # clip embedding = max over time + mean over time of the frame embeddings
    np.testing.assert_allclose(
        to_numpy(encoder(x)), frame_out.max(1) + frame_out.mean(1), rtol=1e-5, atol=1e-5
    )


def test_v2_frames_concatenate_local_and_global():
    encoder = AudioNTT2022(d=256 + 40, n_mels=16)
    x = np.random.default_rng(1).normal(size=(3, 16, 40, 1)).astype("float32")
    frames = to_numpy(encoder.frame_encoder(x))
    assert frames.shape == (3, 10, 296)
    local = to_numpy(keras.Model(encoder.input, encoder.get_layer("flatten_frames").output)(x))
    np.testing.assert_allclose(frames[..., :256], local, rtol=1e-6)
    np.testing.assert_allclose(
        to_numpy(encoder(x)), frames.max(1) + frames.mean(1), rtol=1e-5, atol=1e-5
    )


def test_encoder_batchnorm_matches_pytorch_settings():
    encoder = AudioNTT2020(d=32, n_mels=16)
    bn = encoder.get_layer("bn1")
    assert bn.epsilon == 1e-5 and bn.momentum == pytest.approx(0.9)


def test_encoder_save_load_round_trip():
    encoder = AudioNTT2020(d=32, n_mels=16)
    x = np.random.default_rng(2).normal(size=(2, 16, 24, 1)).astype("float32")
    restored = save_and_load(encoder)
    assert isinstance(restored, AudioNTT2020) and restored.d == 32
    np.testing.assert_allclose(to_numpy(restored(x)), to_numpy(encoder(x)), rtol=1e-6)
    assert tuple(restored.frame_encoder(x).shape) == (2, 3, 32)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_mels"):
        AudioNTT2020(n_mels=60)
    with pytest.raises(ValueError, match="local features"):
        AudioNTT2022(d=1000)


def test_encoders_name_their_version_for_the_probe_patience():
    from byola_keras.evaluation.runner import probe_patience

    assert probe_patience(AudioNTT2020(d=32, n_mels=16)) == 10  # v1 paper
    assert probe_patience(AudioNTT2022(d=256 + 32, n_mels=16)) == 20  # v2 paper
    assert probe_patience(keras.Sequential([keras.layers.Dense(2)])) == 10
