"""byola_keras.data: decoding, manifests, the log-mel cache, segments and the default corpus."""

import math
import os

import keras
import numpy as np
import pytest
import soundfile as sf

from byola_keras import frontend
from byola_keras.data import (
    AUDIO_EXTENSIONS,
    AudioDecodeError,
    LogMelCache,
    SegmentDataset,
    compute_norm_stats,
    find_audio_files,
    load_audio,
    make_default_corpus,
    read_manifest,
)
from byola_keras.data import cache as cache_module
from byola_keras.data.cache import clip_log_mel
from byola_keras.data.dataset import PAD_VALUE
from byola_keras.data.default_corpus import synthesize_clip

F16_TOL = dict(rtol=2e-3, atol=2e-3)  # float16 storage of values within about +-20


@pytest.fixture
def keras_session():
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


def tone(seconds, sr, freq=440.0, channels=1, amplitude=0.5):
    t = np.arange(int(round(seconds * sr))) / sr
    x = amplitude * np.sin(2 * np.pi * freq * t)
    if channels > 1:
        x = np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)
    return x.astype(np.float32)


def write(path, data, sr, **kwargs):
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, data, sr, **kwargs)
    return path


def peak_frequency(wave, sr):
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return np.fft.rfftfreq(wave.size, 1.0 / sr)[np.argmax(spectrum)]


@pytest.fixture
def clips(tmp_path):
    """Five short clips: mixed rates, channels, formats and lengths."""
    rng = np.random.default_rng(0)
    paths = [
        write(tmp_path / "audio" / "a.wav", tone(1.2, 16000, 300), 16000),
        write(tmp_path / "audio" / "b.flac", tone(0.7, 44100, 1000, channels=2), 44100),
        write(
            tmp_path / "audio" / "sub" / "c.wav",
            (0.1 * rng.standard_normal(8000)).astype("float32"),
            16000,
            subtype="FLOAT",
        ),
        write(tmp_path / "audio" / "sub" / "d.wav", tone(0.2, 22050, 2000), 22050),
        write(tmp_path / "audio" / "e.flac", tone(2.0, 16000, 150), 16000),
    ]
    return sorted(paths)


# ---------------------------------------------------------------- decoding


def test_extensions_and_error_type():
    for ext in (".wav", ".flac", ".ogg"):
        assert ext in AUDIO_EXTENSIONS
    err = AudioDecodeError("/x/y.wav", "broken")
    assert isinstance(err, ValueError)
    assert err.path == "/x/y.wav" and err.reason == "broken"
    assert "/x/y.wav" in str(err) and "broken" in str(err)


FORMATS = {
    "wav": {},
    "flac": {},
    "ogg": {},
    "aiff": {},
    "mp3": {"format": "MP3"},
    "opus": {"format": "OGG", "subtype": "OPUS"},
}


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f".{f}" in AUDIO_EXTENSIONS])
def test_load_formats(tmp_path, fmt):
    x = tone(0.5, 16000, 440.0)
    path = write(tmp_path / f"t.{fmt}", x, 16000, **FORMATS[fmt])
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(y.size - x.size) <= 1152  # MP3 frames
    if fmt in ("ogg", "mp3", "opus"):  # lossy
        assert abs(peak_frequency(y, 16000) - 440.0) <= 2.0
    else:
        np.testing.assert_allclose(y, x, atol=1e-4)


@pytest.mark.parametrize("channels", [2, 6])
def test_downmix_averages_channels(tmp_path, channels):
    x = np.random.default_rng(channels).uniform(-0.5, 0.5, (4000, channels)).astype("float32")
    path = write(tmp_path / "multi.wav", x, 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), x.mean(axis=1), atol=1e-6)


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000, 96000])
def test_resampling_keeps_length_and_pitch(tmp_path, sr):
    path = write(tmp_path / "r.wav", tone(0.5, sr, 1000.0), sr, subtype="FLOAT")
    y = load_audio(path)
    assert y.shape == (math.ceil(int(round(0.5 * sr)) * 16000 / sr),)
    assert abs(y.size - 8000) <= 1
    assert abs(peak_frequency(y, 16000) - 1000.0) <= 2.0
    assert np.all(np.isfinite(y))


def test_offset_and_duration(tmp_path):
    x = np.random.default_rng(1).uniform(-0.5, 0.5, 16000).astype("float32")
    path = write(tmp_path / "o.wav", x, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path, offset=0.25, duration=0.5), x[4000:12000])
    np.testing.assert_array_equal(load_audio(path, offset=0.75), x[12000:])
    np.testing.assert_array_equal(load_audio(path, duration=5.0), x)
    path44 = write(tmp_path / "o44.wav", tone(1.0, 44100, 500.0), 44100)
    assert abs(load_audio(path44, offset=0.5, duration=0.25).size - 4000) <= 1
    with pytest.raises(AudioDecodeError, match="past the end"):
        load_audio(path, offset=2.0)
    for kwargs in (
        {"offset": -1.0},
        {"duration": 0.0},
        {"sample_rate": 0},
        {"offset": float("nan")},
    ):
        with pytest.raises(ValueError):
            load_audio(path, **kwargs)


def test_find_audio_files(tmp_path):
    root = tmp_path / "corpus"
    a = write(root / "b" / "x.WAV", tone(0.1, 16000), 16000)
    b = write(root / "a.flac", tone(0.1, 16000), 16000)
    c = write(root / "b" / "c" / "y.Ogg", tone(0.1, 16000), 16000)
    (root / "notes.txt").write_text("not audio")
    (root / "b" / "c" / "loop").symlink_to(root, target_is_directory=True)  # a cycle
    found = find_audio_files(root)
    assert found == sorted([a, b, c])
    assert all(os.path.isabs(p) for p in found)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_audio_files(tmp_path / "nowhere")


# ---------------------------------------------------------------- manifests


def test_read_manifest(tmp_path):
    write(tmp_path / "audio" / "a.wav", tone(0.1, 16000), 16000)
    absolute = write(tmp_path / "elsewhere" / "b.wav", tone(0.1, 16000), 16000)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        f"path,label,split,group\naudio/a.wav,dog,train,g1\n{absolute},cat,val,g2\n\n"
    )
    rows = read_manifest(manifest)
    assert rows == [
        {
            "path": str(tmp_path / "audio" / "a.wav"),
            "label": "dog",
            "split": "train",
            "group": "g1",
        },
        {"path": absolute, "label": "cat", "split": "valid", "group": "g2"},
    ]

    (tmp_path / "bad.csv").write_text("file,label\naudio/a.wav,dog\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) path, split"):
        read_manifest(tmp_path / "bad.csv")
    (tmp_path / "split.csv").write_text("path,label,split\naudio/a.wav,dog,holdout\n")
    with pytest.raises(ValueError, match="line 2: unknown split 'holdout'"):
        read_manifest(tmp_path / "split.csv")
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        read_manifest(tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="missing"):
        read_manifest(manifest, missing="ignore")


# ---------------------------------------------------------------- cache


def test_cache_matches_front_end(tmp_path, clips):
    cache = LogMelCache.build(
        clips, tmp_path / "cache", workers=2, clips_per_shard=2, progress=False
    )
    assert len(cache) == len(clips)
    assert cache.paths == clips
    assert len(cache._shard_files) == 3
    assert cache.skipped == []
    for i, path in enumerate(clips):
        expected = frontend.log_mel_numpy(load_audio(path))
        got = cache[i]
        assert got.dtype == np.float32 and got.shape == expected.shape == (64, cache.lengths[i])
        np.testing.assert_allclose(got, expected, **F16_TOL)
        np.testing.assert_allclose(cache.read(i, 5, 20), got[:, 5:20])
    assert cache[-1].shape == cache[len(clips) - 1].shape
    with pytest.raises(IndexError):
        cache[len(clips)]

    exact = LogMelCache.build(
        clips[:2], tmp_path / "f32", dtype="float32", workers=0, progress=False
    )
    np.testing.assert_allclose(exact[1], frontend.log_mel_numpy(load_audio(clips[1])), atol=1e-5)
    htk = LogMelCache.build(clips[:1], tmp_path / "htk", dtype="float32", htk=True, progress=False)
    np.testing.assert_allclose(
        htk[0], frontend.log_mel_numpy(load_audio(clips[0]), htk=True), atol=1e-5
    )
    assert htk.htk and not exact.htk

    reopened = LogMelCache(tmp_path / "cache")
    np.testing.assert_array_equal(reopened[3], cache[3])


def test_cache_reuse_and_rebuild(tmp_path, clips, monkeypatch, capsys):
    first = LogMelCache.build(clips, tmp_path / "cache", progress=False)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a complete cache must be reused, not decoded again")

    monkeypatch.setattr(cache_module, "clip_log_mel", no_decoding)
    again = LogMelCache.build(clips, tmp_path / "cache", progress=True)
    assert "reusing" in capsys.readouterr().out
    assert again.fingerprint == first.fingerprint and again.paths == first.paths
    monkeypatch.undo()

    # Other settings or another file list: decoded again, old shards removed.
    other = LogMelCache.build(clips[:3], tmp_path / "cache", dtype="float32", progress=False)
    assert len(other) == 3 and other.dtype == np.float32
    shards = [n for n in os.listdir(tmp_path / "cache") if n.startswith("shard-")]
    assert sorted(shards) == sorted(other._shard_files)


def test_cache_grows_with_its_folder(tmp_path, clips, monkeypatch):
    """Added files are decoded and appended, removed ones dropped, a touched one
    decoded again; unchanged files are never decoded twice."""
    decoded = []
    real = cache_module.clip_log_mel

    def counting(path, *args, **kwargs):
        decoded.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "clip_log_mel", counting)
    folder = tmp_path / "cache"
    LogMelCache.build(clips[:3], folder, workers=0, clips_per_shard=1, progress=False)
    assert decoded == clips[:3]

    def build(files):
        decoded.clear()
        cache = LogMelCache.build(files, folder, workers=0, clips_per_shard=1, progress=False)
        new = list(decoded)
        fresh = LogMelCache.build(files, tmp_path / "fresh", workers=0, rebuild=True, progress=False)
        assert cache.paths == fresh.paths
        for i in range(len(cache)):
            np.testing.assert_array_equal(cache[i], fresh[i])
        shards = sorted(n for n in os.listdir(folder) if n.startswith("shard-"))
        assert shards == sorted(cache._shard_files)  # no unreferenced shard left
        return cache, new

    cache, new = build(clips[:4])  # one file added
    assert new == [clips[3]] and cache.changes == {"kept": 3, "decoded": 1, "dropped": 0}
    cache, new = build(clips[1:4])  # one removed
    assert new == [] and cache.changes == {"kept": 3, "decoded": 0, "dropped": 1}
    stat = os.stat(clips[2])
    os.utime(clips[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    cache, new = build(clips[1:4])
    assert new == [clips[2]] and cache.changes == {"kept": 2, "decoded": 1, "dropped": 1}
    cache, new = build(clips[1:4])  # nothing changed: reused as is
    assert new == [] and cache.changes == {"kept": 3, "decoded": 0, "dropped": 0}


def test_cache_rebuilds_after_interrupted_build(tmp_path, clips, monkeypatch):
    real_save = cache_module._atomic_save

    def killed_at_index(path, write, **kwargs):
        if path.endswith(cache_module.INDEX_FILE):
            raise KeyboardInterrupt  # the process dies before the index is written
        return real_save(path, write, **kwargs)

    monkeypatch.setattr(cache_module, "_atomic_save", killed_at_index)
    with pytest.raises(KeyboardInterrupt):
        LogMelCache.build(clips, tmp_path / "cache", clips_per_shard=2, progress=False)
    monkeypatch.undo()
    leftovers = os.listdir(tmp_path / "cache")
    assert (
        any(n.startswith("shard-") for n in leftovers) and cache_module.INDEX_FILE not in leftovers
    )
    assert not any(".tmp-" in n for n in leftovers)
    with pytest.raises(FileNotFoundError, match="No complete log-mel cache"):
        LogMelCache(tmp_path / "cache")

    cache = LogMelCache.build(clips, tmp_path / "cache", clips_per_shard=2, progress=False)
    assert len(cache) == len(clips)
    assert sorted(n for n in os.listdir(tmp_path / "cache") if n.startswith("shard-")) == sorted(
        cache._shard_files
    )

    # A shard cut short after the index was written is detected, then rebuilt.
    expected = cache[len(clips) - 1]
    shard = os.path.join(cache.cache_dir, cache._shard_files[-1])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(ValueError, match="missing or truncated"):
        LogMelCache(tmp_path / "cache")
    rebuilt = LogMelCache.build(clips, tmp_path / "cache", clips_per_shard=2, progress=False)
    np.testing.assert_array_equal(rebuilt[len(clips) - 1], expected)


def test_stopped_build_keeps_what_it_decoded(tmp_path, clips, monkeypatch):
    """`should_stop` (a signal's flag) ends a build after the current file: the
    clips decoded so far are indexed, the next build decodes only the rest."""
    asked = []

    def stop_after_three():
        asked.append(1)
        return len(asked) >= 3

    folder = tmp_path / "cache"
    with pytest.raises(cache_module.BuildStopped, match="3 clip\\(s\\) decoded and kept") as stopped:
        LogMelCache.build(clips, folder, workers=2, clips_per_shard=2, progress=False, should_stop=stop_after_three)
    assert (stopped.value.decoded, stopped.value.remaining) == (3, len(clips) - 3)
    assert LogMelCache(folder).paths == clips[:3]  # indexed, and never taken for complete:
    decoded = []
    real = cache_module.clip_log_mel
    monkeypatch.setattr(cache_module, "clip_log_mel", lambda path, *a, **k: decoded.append(path) or real(path, *a, **k))
    cache = LogMelCache.build(clips, folder, workers=0, progress=False)
    assert decoded == clips[3:] and cache.changes == {"kept": 3, "decoded": len(clips) - 3, "dropped": 0}
    fresh = LogMelCache.build(clips, tmp_path / "fresh", workers=0, progress=False)
    for i in range(len(clips)):
        np.testing.assert_array_equal(cache[i], fresh[i])
    with pytest.raises(cache_module.BuildStopped, match=f"1 clip\\(s\\) decoded and kept .* {len(clips) - 1} left"):
        LogMelCache.build(clips, tmp_path / "other", workers=0, progress=False, should_stop=lambda: True)


@pytest.mark.parametrize("channels", [1, 2, 3, 6, 8, 10])
def test_downmix_is_numpy_channel_mean_bit_for_bit(channels):
    from byola_keras.data.audio import _downmix

    rng = np.random.default_rng(channels)
    data = rng.normal(size=(4001, channels)).astype(np.float32)
    data *= rng.uniform(0.01, 100.0, channels).astype(np.float32)
    mono = _downmix(data)
    assert mono.dtype == np.float32 and mono.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(mono, data.mean(axis=1, dtype=np.float32))


def _open_files():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc (Linux)")
def test_cache_of_many_shards_reads_without_holding_files(tmp_path):
    # A corpus of millions of clips has thousands of shards (AudioSet: about
    # 1,900): reads must not keep a file (or a mapping, which holds one) open
    # per shard, or they run out of descriptors. One clip per shard here.
    rng = np.random.default_rng(5)
    paths = [
        write(tmp_path / "audio" / f"c{k:03d}.wav", rng.uniform(-0.5, 0.5, 1600 + 160 * k).astype("float32"), 16000)
        for k in range(80)
    ]
    many = LogMelCache.build(paths, tmp_path / "many", clips_per_shard=1, workers=2, progress=False)
    one = LogMelCache.build(paths, tmp_path / "one", workers=2, progress=False)
    assert len(many._shard_files) == 80 and len(one._shard_files) == 1
    before = _open_files()
    for _ in range(2):
        for i in rng.permutation(80):
            start = int(rng.integers(0, 10))
            np.testing.assert_array_equal(many.read(int(i), start, start + 7), one.read(int(i), start, start + 7))
    np.testing.assert_array_equal(many[79], one[79])
    assert _open_files() == before
    segments = SegmentDataset(many, batch_size=40, segment_frames=16)
    np.testing.assert_array_equal(segments[1], SegmentDataset(one, batch_size=40, segment_frames=16)[1])
    assert _open_files() == before


def test_shard_cut_short_after_opening_names_the_file(tmp_path, clips):
    cache = LogMelCache.build(clips, tmp_path / "cache", clips_per_shard=2, progress=False)
    last = len(clips) - 1
    shard = os.path.join(cache.cache_dir, cache._shard_files[-1])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 64)
    cache.read(last, 0, 1)  # the first frames are still there
    with pytest.raises(ValueError, match="shard-.*truncated"):
        cache[last]


def test_long_clip_decoded_in_blocks_equals_one_pass(tmp_path):
    x = np.random.default_rng(2).uniform(-0.5, 0.5, (int(3.3 * 44100), 2)).astype("float32")
    path = write(tmp_path / "long.wav", x, 44100, subtype="FLOAT")
    whole = frontend.log_mel_numpy(load_audio(path))
    blocks, nonfinite = clip_log_mel(path, chunk_seconds=1)
    assert nonfinite == 0 and blocks.shape == whole.shape
    np.testing.assert_allclose(blocks, whole, atol=1e-4)


def test_max_seconds_window_is_deterministic(tmp_path):
    x = np.random.default_rng(3).uniform(-0.5, 0.5, 3 * 16000).astype("float32")
    first = write(tmp_path / "w.wav", x, 16000, subtype="FLOAT")
    second = write(tmp_path / "v.wav", x, 16000, subtype="FLOAT")
    a = LogMelCache.build(
        [first, second], tmp_path / "a", max_seconds=1.0, dtype="float32", progress=False
    )
    b = LogMelCache.build(
        [first, second], tmp_path / "b", max_seconds=1.0, dtype="float32", progress=False
    )
    assert a.lengths.tolist() == [101, 101]
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], a[1])  # windows are drawn per file
    full = frontend.log_mel_numpy(x)
    assert a[0].min() >= full.min() - 1.0 and a[0].max() <= full.max() + 1.0


def test_norm_stats_against_numpy(tmp_path, clips):
    cache = LogMelCache.build(clips, tmp_path / "cache", progress=False)
    mean, std = compute_norm_stats(cache)
    values = np.concatenate([cache[i].ravel() for i in range(len(cache))]).astype(np.float64)
    assert isinstance(mean, float) and isinstance(std, float)
    assert mean == pytest.approx(values.mean(), abs=1e-9)
    assert std == pytest.approx(values.std(), abs=1e-9)

    subset = compute_norm_stats(cache, max_clips=2, seed=1)
    assert subset == compute_norm_stats(cache, max_clips=2, seed=1)
    candidates = [
        float(np.concatenate([cache[i].ravel(), cache[j].ravel()]).astype(np.float64).mean())
        for i in range(len(cache))
        for j in range(i + 1, len(cache))
    ]
    assert min(abs(subset[0] - c) for c in candidates) < 1e-9

    # float64 accumulation: a large offset with a small spread.
    rng = np.random.default_rng(0)
    arrays = [
        (1000.0 + 0.01 * rng.standard_normal((64, 500))).astype(np.float32) for _ in range(20)
    ]
    mean, std = compute_norm_stats(arrays)
    ref = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
    assert mean == pytest.approx(ref.mean(), rel=1e-12)
    assert std == pytest.approx(ref.std(), rel=1e-6)


# ---------------------------------------------------------------- segments


@pytest.fixture
def small_cache(tmp_path):
    lengths = [0.3, 1.0, 1.5, 0.8, 2.0, 0.5, 1.2]
    rng = np.random.default_rng(4)
    paths = [
        write(
            tmp_path / "seg" / f"{i}.wav",
            rng.uniform(-0.3, 0.3, int(s * 16000)).astype("float32"),
            16000,
            subtype="FLOAT",
        )
        for i, s in enumerate(lengths)
    ]
    return LogMelCache.build(paths, tmp_path / "seg-cache", workers=0, progress=False)


def test_segment_dataset_batches(small_cache):
    frames = 48
    data = SegmentDataset(small_cache, batch_size=3, segment_frames=frames, seed=7)
    assert len(data) == len(small_cache) // 3 == 2
    x = data[1]
    assert x.shape == (3, 64, frames, 1) and x.dtype == np.float32
    clips, offsets = data.batch_clips(1)
    for b, (clip, offset) in enumerate(zip(clips, offsets)):
        length = small_cache.lengths[clip]
        assert 0 <= offset <= max(0, length - frames)
        seg = small_cache.read(clip, offset, offset + frames)
        np.testing.assert_array_equal(x[b, :, : seg.shape[1], 0], seg)
        np.testing.assert_array_equal(x[b, :, seg.shape[1] :, 0], PAD_VALUE)
    assert PAD_VALUE == pytest.approx(math.log(frontend.LOG_EPS))

    # Each epoch: every clip at most once per pass, a new order and new offsets.
    seen = np.concatenate([data.batch_clips(i)[0] for i in range(len(data))])
    assert len(set(seen.tolist())) == seen.size
    first = [data[i] for i in range(len(data))]
    data.on_epoch_end()
    assert data.epoch == 1
    second = [data[i] for i in range(len(data))]
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))

    # Deterministic given (seed, epoch, index): a resumed run sees the same batches.
    resumed = SegmentDataset(small_cache, batch_size=3, segment_frames=frames, seed=7)
    resumed.epoch = 1
    for i in reversed(range(len(data))):
        np.testing.assert_array_equal(resumed[i], second[i])
    other_seed = SegmentDataset(small_cache, batch_size=3, segment_frames=frames, seed=8)
    assert not all(np.array_equal(other_seed[i], first[i]) for i in range(len(data)))


def test_segment_dataset_padding_and_lengths(small_cache):
    short = int(np.argmin(small_cache.lengths))
    data = SegmentDataset(small_cache, batch_size=len(small_cache), segment_frames=96)
    x = data[0]
    row = int(np.flatnonzero(data.batch_clips(0)[0] == short)[0])
    n = small_cache.lengths[short]
    assert n < 96
    np.testing.assert_array_equal(x[row, :, :n, 0], small_cache[short])
    assert np.all(x[row, :, n:, 0] == np.float32(PAD_VALUE))

    big = SegmentDataset(small_cache, batch_size=16, segment_frames=8)
    assert len(big) == 1 and big[0].shape == (16, 64, 8, 1)  # clips repeated
    assert len(SegmentDataset(small_cache, batch_size=2, steps_per_epoch=5)) == 5
    with pytest.raises(IndexError):
        data[1]
    for bad in (
        {"batch_size": 0},
        {"batch_size": 2, "segment_frames": 0},
        {"batch_size": 2, "seed": -1},
    ):
        with pytest.raises(ValueError):
            SegmentDataset(small_cache, **bad)


class TinyModel(keras.Model):
    """A stand-in learner: x only, loss = mean squared output."""

    def __init__(self):
        super().__init__()
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(self.pool(x))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return keras.ops.mean(keras.ops.square(y_pred))


class _RecordEpochs(keras.callbacks.Callback):
    def __init__(self, data):
        super().__init__()
        self.data = data
        self.seen = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.seen[epoch] = self.data.epoch


@pytest.mark.parametrize("workers", [1, 2])
def test_segment_dataset_trains_with_fit_and_resumes(small_cache, workers, keras_session):
    data = SegmentDataset(small_cache, batch_size=2, segment_frames=16, workers=workers)
    model = TinyModel()
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
    full = _RecordEpochs(data)
    history = model.fit(data, epochs=3, shuffle=False, verbose=0, callbacks=[full])
    assert len(history.history["loss"]) == 3 and np.all(np.isfinite(history.history["loss"]))
    assert len(set(full.seen.values())) == 3  # a new data epoch for every epoch

    # Resuming at epoch 2 (fresh objects, .epoch = initial_epoch) reads the same data epoch.
    resumed_data = SegmentDataset(small_cache, batch_size=2, segment_frames=16, workers=workers)
    resumed_data.epoch = 2
    resumed = _RecordEpochs(resumed_data)
    model = TinyModel()
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
    model.fit(
        resumed_data, epochs=3, initial_epoch=2, shuffle=False, verbose=0, callbacks=[resumed]
    )
    assert resumed.seen == {2: full.seen[2]}


# ---------------------------------------------------------------- default corpus


def test_default_corpus(tmp_path, monkeypatch):
    directory = make_default_corpus(tmp_path / "corpus", num_clips=40, seed=0)
    files = find_audio_files(directory)
    assert len(files) == 40
    assert (
        sum(f.endswith(".wav") for f in files) == 20
        and sum(f.endswith(".flac") for f in files) == 20
    )
    for path in files[::5]:
        info = sf.info(path)
        assert info.samplerate == 16000 and info.channels == 1 and 1.0 <= info.duration <= 3.0
        wave = load_audio(path)
        assert np.all(np.isfinite(wave)) and 0 < np.abs(wave).max() < 1.0
    rows = read_manifest(os.path.join(directory, "manifest.csv"))
    assert len(rows) == 40 and {r["split"] for r in rows} == {"train", "valid", "test"}
    assert len({r["label"] for r in rows}) == 8
    # Clips are written by several threads: each file and manifest row holds
    # the clip of its own index.
    for i in (0, 1, 17, 38, 39):
        assert rows[i]["path"].endswith(f"_{i:04d}.{'wav' if i % 2 == 0 else 'flac'}")
        np.testing.assert_allclose(sf.read(rows[i]["path"])[0], synthesize_clip(i, 0), atol=2**-15)

    mtimes = [os.path.getmtime(f) for f in files]
    assert make_default_corpus(tmp_path / "corpus", num_clips=40, seed=0) == directory
    assert [os.path.getmtime(f) for f in files] == mtimes  # reused, not rewritten

    twin = make_default_corpus(tmp_path / "twin", num_clips=40, seed=0)
    for a, b in zip(files[:6], find_audio_files(twin)[:6]):
        np.testing.assert_array_equal(sf.read(a)[0], sf.read(b)[0])
    other = make_default_corpus(tmp_path / "other", num_clips=8, seed=1)
    assert not np.array_equal(sf.read(find_audio_files(other)[0])[0], sf.read(files[0])[0])

    # A smaller corpus written over a bigger one leaves no stale clips behind.
    assert len(find_audio_files(make_default_corpus(tmp_path / "corpus", num_clips=8))) == 8

    monkeypatch.setenv("BYOLA_KERAS_CACHE", str(tmp_path / "root"))
    default = make_default_corpus(num_clips=8)
    assert default == str(tmp_path / "root" / "default-corpus-v1-n8-s0")


def test_default_corpus_classes_are_distinguishable(tmp_path):
    """A nearest-centroid classifier on mean log-mel spectra beats chance by far."""
    directory = make_default_corpus(tmp_path / "corpus", num_clips=64)
    rows = read_manifest(os.path.join(directory, "manifest.csv"))
    feats = np.stack(
        [
            np.concatenate([m.mean(axis=1), m.std(axis=1)])
            for m in (clip_log_mel(r["path"])[0] for r in rows)
        ]
    )
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    labels = np.array([r["label"] for r in rows])
    correct = 0
    for i in range(len(rows)):
        keep = np.arange(len(rows)) != i
        classes = sorted(set(labels[keep]))
        centroids = np.stack([feats[keep & (labels == c)].mean(0) for c in classes])
        correct += classes[int(np.argmin(((centroids - feats[i]) ** 2).sum(1)))] == labels[i]
    assert correct / len(rows) > 0.4  # chance: 0.125


def test_cache_and_dataset_pickle(small_cache):
    """What process-based data loading needs: copies read the same data."""
    import pickle

    data = SegmentDataset(small_cache, batch_size=3, segment_frames=16, seed=3)
    data.epoch = 4
    clone = pickle.loads(pickle.dumps(data))
    assert clone.epoch == 4
    np.testing.assert_array_equal(clone[1], data[1])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(small_cache))[2], small_cache[2])
