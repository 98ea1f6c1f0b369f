"""byola_keras.data on awkward and broken input: handled, or skipped and counted by name."""

import os
import warnings

import numpy as np
import pytest
import soundfile as sf

from byola_keras import frontend
from byola_keras.data import (
    AudioDecodeError,
    LogMelCache,
    SegmentDataset,
    compute_norm_stats,
    find_audio_files,
    load_audio,
    read_manifest,
)
from byola_keras.data.cache import clip_log_mel
from byola_keras.data.dataset import PAD_VALUE

LOG_EPS = np.log(np.float32(frontend.LOG_EPS))


def write(path, data, sr=16000, **kwargs):
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, data, sr, **kwargs)
    return path


def noise(seconds, sr=16000, seed=0, amplitude=0.3):
    return (amplitude * np.random.default_rng(seed).uniform(-1, 1, int(seconds * sr))).astype(
        np.float32
    )


def truncated_wav(path):
    full = write(str(path) + ".full.wav", noise(1.0), subtype="PCM_16")
    data = open(full, "rb").read()
    os.remove(full)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return str(path)


def truncated_flac(path):
    full = write(str(path) + ".full.flac", noise(1.0))
    data = open(full, "rb").read()
    os.remove(full)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return str(path)


def corrupt_header(path):
    good = write(str(path) + ".good.wav", noise(0.5))
    data = bytearray(open(good, "rb").read())
    os.remove(good)
    data[:16] = b"\x13\x37" * 8
    with open(path, "wb") as f:
        f.write(bytes(data))
    return str(path)


def text_file(path):
    with open(path, "w") as f:
        f.write("This is not audio, just a text file renamed to .wav\n" * 20)
    return str(path)


def dangling_symlink(path):
    os.symlink(os.path.join(os.path.dirname(path), "gone.wav"), path)
    return str(path)


def directory(path):
    os.makedirs(path)
    return str(path)


def empty_file(path):
    open(path, "wb").close()
    return str(path)


def zero_frames(path):
    return write(path, np.zeros(0, np.float32))


BROKEN = {
    "truncated.wav": (truncated_wav, "truncated"),
    "truncated.flac": (truncated_flac, "truncated or corrupt"),
    "corrupt_header.wav": (corrupt_header, "not recognised"),
    "text.wav": (text_file, "not recognised"),
    "dangling.wav": (dangling_symlink, "dangling symbolic link"),
    "folder.wav": (directory, "is a directory"),
    "empty.wav": (empty_file, "empty"),
    "zero_frames.wav": (zero_frames, "no audio samples"),
}


def _overflowing(value, where=None):
    """A float WAV whose samples are finite but so large that the power
    spectrum overflows float32 (all of them, or one sample at `where`)."""

    def make(path):
        x = noise(0.5, seed=3)
        if where is None:
            x = (np.sign(x) * value).astype(np.float32)
        else:
            x[where] = value
        return write(path, x, subtype="FLOAT")

    return make


# Files that decode, but whose log-mel is not finite: skipped and counted like
# broken files, never fed to the statistics or to training.
NONFINITE_LOG_MEL = {
    "overflow_1e30.wav": (_overflowing(1e30), "peak sample 1e+30"),
    "overflow_1e20.wav": (_overflowing(1e20), "peak sample 1e+20"),
    "spike_1e30.wav": (_overflowing(1e30, where=4000), "peak sample 1e+30"),
    "float32_max.wav": (_overflowing(np.finfo(np.float32).max), "peak sample 3.4e+38"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_file_raises_decode_error_naming_it(tmp_path, name):
    make, reason = BROKEN[name]
    path = make(str(tmp_path / name))
    with pytest.raises(AudioDecodeError) as info:
        load_audio(path)
    assert info.value.path == path
    assert path in str(info.value)
    assert reason.lower() in info.value.reason.lower()
    with pytest.raises(AudioDecodeError):
        clip_log_mel(path)


def test_broken_files_are_skipped_and_counted(tmp_path, capsys):
    good = [write(tmp_path / "audio" / f"good{i}.wav", noise(0.5, seed=i)) for i in range(13)]
    table = {**BROKEN, **NONFINITE_LOG_MEL}
    bad = [make(str(tmp_path / "audio" / name)) for name, (make, _) in sorted(table.items())]
    files = sorted(good + bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the overflow is handled, not warned about by NumPy
        cache = LogMelCache.build(files, tmp_path / "cache", workers=2, progress=True)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert f"decoded 13 clips, skipped {len(bad)} (see " in out[0]
    assert len(cache) == 13 and cache.paths == sorted(good)
    assert sorted(p for p, _ in cache.skipped) == sorted(bad)
    assert all(reason for _, reason in cache.skipped)
    reasons = dict(cache.skipped)
    for name, (_, expected) in NONFINITE_LOG_MEL.items():
        reason = reasons[str(tmp_path / "audio" / name)]
        assert "log-mel is not finite" in reason and "overflows float32" in reason and expected in reason
    assert all(np.all(np.isfinite(cache[i])) for i in range(len(cache)))
    mean, std = compute_norm_stats(cache)
    assert np.isfinite(mean) and 0.1 < std < 10.0
    listed = open(tmp_path / "cache" / "skipped.tsv").read()
    assert all(path in listed for path in bad)
    # The skip list survives reopening the cache.
    assert LogMelCache(tmp_path / "cache").skipped == cache.skipped


def test_folder_where_most_files_fail_stops_clearly(tmp_path):
    root = tmp_path / "mostly_broken"
    write(root / "ok.wav", noise(0.5))
    for i in range(4):
        text_file(str(root / f"text{i}.wav"))
    files = find_audio_files(root)
    with pytest.raises(
        ValueError, match="More than half of the 5 audio files could not be decoded"
    ) as info:
        LogMelCache.build(files, tmp_path / "cache", workers=0, progress=False)
    assert str(root / "text0.wav") in str(info.value)
    assert "skipped.tsv" in str(info.value)
    with pytest.raises(FileNotFoundError):
        LogMelCache(tmp_path / "cache")  # nothing half-usable was left behind

    with pytest.raises(ValueError, match="More than half of the 5"):
        LogMelCache.build(files, tmp_path / "cache", workers=2, progress=False)
    with pytest.raises(
        ValueError, match=r"None of the 1 audio file\(s\) could be decoded; e.g. '.*text3.wav'"
    ):
        LogMelCache.build(files[-1:], tmp_path / "cache", workers=2, progress=False)


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no audio here")
    with pytest.raises(ValueError, match=f"No audio file found in '{tmp_path / 'empty'}'"):
        find_audio_files(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        find_audio_files(tmp_path / "missing")
    with pytest.raises(ValueError, match="empty"):
        LogMelCache.build([], tmp_path / "cache", progress=False)


def test_manifest_naming_missing_files(tmp_path):
    write(tmp_path / "a.wav", noise(0.2))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,split\na.wav,x,train\nlost.wav,y,test\n")
    with pytest.raises(FileNotFoundError, match=r"line 3: '.*lost\.wav'") as info:
        read_manifest(manifest)
    assert 'missing="skip"' in str(info.value)
    with pytest.warns(RuntimeWarning, match="lost.wav"):
        rows = read_manifest(manifest, missing="skip")
    assert [r["label"] for r in rows] == ["x"]


def test_silent_clip_gives_finite_log_mel(tmp_path):
    path = write(tmp_path / "silence.wav", np.zeros(16000, np.float32))
    log_mel, _ = clip_log_mel(path)
    assert np.all(np.isfinite(log_mel))
    np.testing.assert_allclose(log_mel, LOG_EPS, atol=1e-6)
    cache = LogMelCache.build([path], tmp_path / "cache", progress=False)
    assert np.all(np.isfinite(cache[0]))
    with pytest.raises(ValueError, match="constant"):
        compute_norm_stats(cache)  # an all-silent corpus cannot be normalised


def test_nan_and_inf_samples_become_zero(tmp_path):
    x = noise(0.5)
    x[[10, 500, 7000]] = [np.nan, np.inf, -np.inf]
    path = write(tmp_path / "nan.wav", x, subtype="FLOAT")
    with pytest.warns(RuntimeWarning, match=r"nan\.wav'?: replaced 3 non-finite"):
        y = load_audio(path)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[[10, 500, 7000]], 0.0)
    stereo = np.stack([x, noise(0.5, seed=1)], axis=1)
    path2 = write(tmp_path / "nan2.wav", stereo, subtype="FLOAT")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y2 = load_audio(path2)
    assert y2[10] == pytest.approx(stereo[10, 1] / 2)
    cache = LogMelCache.build(
        [path, path2, write(tmp_path / "ok.wav", noise(0.5))], tmp_path / "cache", progress=False
    )
    assert cache.nonfinite_clips == 2 and len(cache) == 3
    assert cache.nonfinite_files == [(path, 3), (path2, 3)]
    assert LogMelCache(tmp_path / "cache").nonfinite_files == cache.nonfinite_files
    assert all(np.all(np.isfinite(cache[i])) for i in range(3))


def test_non_finite_log_mels_are_left_out_of_the_statistics():
    """A cache built before such clips were skipped may hold non-finite values:
    the statistics use the finite ones and say which clips held the others."""
    rng = np.random.default_rng(0)
    clips = [rng.normal(-5.0, 2.0, (64, 50)).astype(np.float32) for _ in range(3)]
    bad = clips[1].copy()
    bad[:, :10] = np.inf
    bad[0, 10] = np.nan
    with pytest.warns(RuntimeWarning, match=r"left out 641 non-finite log-mel value\(s\) of 1 clip\(s\), e.g. clip 1 \(641\)"):
        mean, std = compute_norm_stats([clips[0], bad, clips[2]])
    finite = np.concatenate([clips[0].ravel(), bad[np.isfinite(bad)], clips[2].ravel()]).astype(np.float64)
    assert mean == pytest.approx(finite.mean(), rel=1e-9) and std == pytest.approx(finite.std(), rel=1e-9)


# Extreme but finite audio: kept, finite log-mels and statistics.
EXTREME_FINITE = {
    "denormal": (lambda: (1e-40 * noise(0.5)).astype(np.float32), "FLOAT"),
    "smallest_denormal": (lambda: np.full(8000, np.float32(1.4e-45)), "FLOAT"),
    "int16_full_scale": (lambda: np.where(noise(0.5) > 0, 1.0, -1.0).astype(np.float32), "PCM_16"),
    "dc_offset": (lambda: (0.9 + 0.05 * noise(0.5)).astype(np.float32), "FLOAT"),
    "loud_1e15": (lambda: (1e15 * noise(0.5)).astype(np.float32), "FLOAT"),
}


def test_extreme_but_finite_audio_is_kept(tmp_path):
    paths = [write(tmp_path / f"{name}.wav", make(), subtype=subtype) for name, (make, subtype) in EXTREME_FINITE.items()]
    paths.append(write(tmp_path / "ok.wav", noise(0.5)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = LogMelCache.build(paths, tmp_path / "cache", workers=0, progress=False)
        mean, std = compute_norm_stats(cache)
    assert cache.skipped == [] and len(cache) == len(paths)
    for i in range(len(cache)):
        log_mel = cache[i]
        assert np.all(np.isfinite(log_mel)) and log_mel.min() >= LOG_EPS - 0.1, cache.paths[i]
    assert np.isfinite(mean) and np.isfinite(std) and std > 0
    # Silence below float32's resolution is the padding value; 1e15 is about +70.
    np.testing.assert_allclose(cache[cache.paths.index(paths[1])], LOG_EPS, atol=0.01)
    assert cache[cache.paths.index(paths[4])].max() > 60


def test_clipping_and_dc_offset_are_kept(tmp_path):
    x = np.clip(0.3 + 1.5 * np.sin(2 * np.pi * 100 * np.arange(8000) / 16000), -1.0, 1.0).astype(
        np.float32
    )
    path = write(tmp_path / "clipped.wav", x, subtype="FLOAT")
    y = load_audio(path)
    np.testing.assert_array_equal(y, x)
    assert y.max() == 1.0 and y.mean() == pytest.approx(x.mean())
    over = write(tmp_path / "over.wav", 1.7 * x, subtype="FLOAT")  # float files may exceed +-1
    assert load_audio(over).max() == pytest.approx(1.7)


@pytest.mark.parametrize("samples", [1, 100, 512])
def test_clip_shorter_than_one_frame(tmp_path, samples):
    path = write(tmp_path / "tiny.wav", noise(samples / 16000))
    assert load_audio(path).shape == (samples,)
    cache = LogMelCache.build(
        [path, write(tmp_path / "ok.wav", noise(0.5))], tmp_path / "cache", progress=False
    )
    assert cache.lengths[0] == frontend.num_frames(samples) >= 1
    assert np.all(np.isfinite(cache[0]))
    x = SegmentDataset(cache, batch_size=2, segment_frames=8)[0]
    tiny = int(
        np.flatnonzero(
            SegmentDataset(cache, batch_size=2, segment_frames=8).batch_clips(0)[0] == 0
        )[0]
    )
    assert np.all(x[tiny, :, cache.lengths[0] :, 0] == np.float32(PAD_VALUE))


class _ReadSpy:
    """Records the number of frames of every `soundfile.SoundFile.read` call."""

    def __init__(self, monkeypatch):
        self.frames = []
        real = sf.SoundFile.read
        spy = self

        def read(self, frames=-1, *args, **kwargs):
            spy.frames.append(frames)
            return real(self, frames, *args, **kwargs)

        monkeypatch.setattr(sf.SoundFile, "read", read)


def test_long_clip_reads_only_what_it_needs(tmp_path, monkeypatch):
    sr, seconds = 44100, 12
    x = noise(seconds, sr=sr, seed=5)
    path = write(tmp_path / "long.wav", x, sr, subtype="FLOAT")
    spy = _ReadSpy(monkeypatch)

    segment = load_audio(path, offset=7.0, duration=0.5)
    assert spy.frames == [int(0.5 * sr)]
    assert segment.shape == (8000,)

    spy.frames.clear()
    blocks, _ = clip_log_mel(path, chunk_seconds=2)
    assert (
        0 < max(spy.frames) <= (2 + 4) * sr
    )  # a block and its 1-2 s margins, never the whole file
    assert len(spy.frames) == -(
        -frontend.num_frames(seconds * 16000) // 200
    )  # blocks of 200 frames
    spy.frames.clear()
    whole = frontend.log_mel_numpy(load_audio(path))
    assert spy.frames == [seconds * sr]
    np.testing.assert_allclose(blocks, whole, atol=1e-4)

    spy.frames.clear()
    cache = LogMelCache.build(
        [path], tmp_path / "cache", max_seconds=1.0, workers=0, progress=False
    )
    assert cache.lengths.tolist() == [101]
    assert spy.frames == [sr]


@pytest.mark.parametrize("sr", [8000, 11025, 32000, 88200, 96000])
def test_any_sample_rate_caches_at_16k(tmp_path, sr):
    t = np.arange(int(0.6 * sr)) / sr
    x = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    path = write(tmp_path / f"r{sr}.flac", x, sr)
    cache = LogMelCache.build([path], tmp_path / "cache", dtype="float32", progress=False)
    assert cache.lengths[0] == frontend.num_frames(load_audio(path).size)
    log_mel = cache[0]
    assert np.all(np.isfinite(log_mel))
    centers = frontend.mel_to_hz(
        np.linspace(
            frontend.hz_to_mel(frontend.F_MIN),
            frontend.hz_to_mel(frontend.F_MAX),
            frontend.N_MELS + 2,
        )
    )[1:-1]
    peak_bin = int(np.argmax(log_mel[:, 20:-20].mean(axis=1)))
    assert abs(centers[peak_bin] - 1000) < 100  # the 1 kHz tone lands in the 1 kHz bin


def test_decode_error_is_picklable():
    import pickle

    err = pickle.loads(pickle.dumps(AudioDecodeError("/a/b.wav", "why")))
    assert isinstance(err, AudioDecodeError) and err.path == "/a/b.wav" and err.reason == "why"
