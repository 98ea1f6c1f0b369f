"""Finding and decoding audio files: any format libsndfile reads -> 16 kHz mono float32.

Decoding uses `soundfile` (libsndfile) and reads only the frames it needs, so a
segment of an hour-long file costs a segment's worth of I/O. Channels are
averaged, the rate is converted with `librosa.resample` (imported lazily: it is
slow to import), NaN/inf samples become 0 (with a warning naming the file), and
DC offset or clipping are kept as recorded. Every way a file can fail to decode
(missing, a directory, empty, truncated, corrupt, not audio) raises
`AudioDecodeError`, a `ValueError` that names the file and the reason, so that
callers can skip and count broken files instead of dying mid-training.
"""

import math
import os
import re
import warnings

import numpy as np
import soundfile as sf

from byola_keras import frontend


def _supported_extensions():
    formats = sf.available_formats()
    candidates = [
        (".wav", "WAV"),
        (".flac", "FLAC"),
        (".ogg", "OGG"),
        (".oga", "OGG"),
        (".mp3", "MP3"),
        (".aif", "AIFF"),
        (".aiff", "AIFF"),
        (".opus", "OGG"),
    ]
    extensions = [ext for ext, fmt in candidates if fmt in formats]
    if ".opus" in extensions and "OPUS" not in sf.available_subtypes("OGG"):
        extensions.remove(".opus")
    return tuple(extensions)


# File extensions `find_audio_files` collects (lower case); each one is listed only
# when the installed libsndfile can decode it (MP3 needs libsndfile >= 1.1).
AUDIO_EXTENSIONS = _supported_extensions()


class AudioDecodeError(ValueError):
    """An audio file could not be decoded.

    Attributes:
        path: the file, as given.
        reason: why, in words.
    """

    def __init__(self, path, reason):
        self.path = os.fspath(path)
        self.reason = str(reason)
        super().__init__(f"Cannot decode audio file '{self.path}': {self.reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


def find_audio_files(root):
    """All audio files under `root`, recursively, as sorted absolute paths.

    Extensions are matched case-insensitively against `AUDIO_EXTENSIONS`.
    Symbolic links to folders are followed, each real folder once (no loops).
    Hidden entries (names starting with ".") below `root` are ignored. Files are
    listed, not decoded: a broken file is reported when it is decoded.

    Args:
        root: a folder (str or path-like).

    Returns:
        A list of absolute paths (str), sorted.

    Raises:
        FileNotFoundError: `root` does not exist.
        NotADirectoryError: `root` is not a folder.
        ValueError: `root` holds no audio file.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.exists(root):
        raise FileNotFoundError(f"Audio folder '{root}' does not exist.")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"'{root}' is not a folder (expected a folder of audio files).")
    found = []
    visited = set()
    unreadable = []
    for folder, dirnames, filenames in os.walk(
        root, followlinks=True, onerror=lambda err: unreadable.append(err.filename)
    ):
        try:
            stat = os.stat(folder)
        except OSError:
            dirnames[:] = []
            continue
        key = (stat.st_dev, stat.st_ino)
        if key in visited:
            dirnames[:] = []
            continue
        visited.add(key)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(AUDIO_EXTENSIONS):
                found.append(os.path.join(folder, name))
    if unreadable:
        warnings.warn(
            f"Could not list {len(unreadable)} folder(s) under '{root}', e.g. '{unreadable[0]}'.",
            RuntimeWarning,
            stacklevel=2,
        )
    if not found:
        raise ValueError(
            f"No audio file found in '{root}' "
            f"(looked recursively for {', '.join(AUDIO_EXTENSIONS)})."
        )
    return sorted(found)


def _check_path(path):
    """Reasons a path cannot be opened that libsndfile reports badly."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"dangling symbolic link (points to '{os.readlink(path)}')"
    if not os.path.exists(path):
        return "file does not exist"
    if os.path.isdir(path):
        return "is a directory, not a file"
    if not os.access(path, os.R_OK):
        return "permission denied"
    if os.path.getsize(path) == 0:
        return "file is empty (0 bytes)"
    return None


# libsndfile reports a WAV/AIFF data chunk longer than the file as e.g.
# "data : 96000 (should be 47978)"; streaming writers use 0 or 0xFFFFFFFF on purpose.
_SHOULD_BE = re.compile(r"data\s*:\s*(\d+)\s*\(should be (\d+)\)")
_STREAMING_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF - 1}


class _SourceReader:
    """An open audio file: reads frame ranges as mono float32 at the file's rate.

    Counts the non-finite samples it replaces with 0 in `nonfinite`.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        reason = _check_path(self.path)
        if reason:
            raise AudioDecodeError(self.path, reason)
        try:
            self.file = sf.SoundFile(self.path)
        except Exception as err:  # libsndfile raises RuntimeError subclasses, cffi OSError
            raise AudioDecodeError(self.path, _describe(err)) from None
        try:
            self.sample_rate = int(self.file.samplerate)
            self.frames = int(self.file.frames)
            self.channels = int(self.file.channels)
            self.format = str(self.file.format)
            if self.sample_rate <= 0:
                raise AudioDecodeError(self.path, f"invalid sample rate {self.sample_rate}")
            if self.channels <= 0:
                raise AudioDecodeError(self.path, f"invalid channel count {self.channels}")
            if self.frames <= 0:
                raise AudioDecodeError(self.path, "contains no audio samples (0 frames)")
            self._check_truncated_header()
        except BaseException:
            self.file.close()
            raise
        self.nonfinite = 0

    def _check_truncated_header(self):
        match = _SHOULD_BE.search(self.file.extra_info or "")
        if match:
            declared, actual = int(match.group(1)), int(match.group(2))
            if declared not in _STREAMING_SIZES and actual < declared:
                raise AudioDecodeError(
                    self.path,
                    f"file is truncated: the header declares {declared} bytes of audio, "
                    f"only {actual} are present",
                )

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self, start, stop):
        """Frames [start, stop) as a mono float32 vector (channels averaged)."""
        start = max(0, int(start))
        stop = min(self.frames, int(stop))
        count = stop - start
        if count <= 0:
            return np.zeros(0, np.float32)
        try:
            if start:
                self.file.seek(start)
            elif self.file.tell() != 0:
                self.file.seek(0)
            data = self.file.read(count, dtype="float32", always_2d=True)
        except Exception as err:
            raise AudioDecodeError(
                self.path,
                f"decoding failed after frame {start} ({_describe(err)}); truncated or corrupt?",
            ) from None
        got = data.shape[0]
        if got < count:
            # libsndfile's frame count is exact except for MP3, where it is an
            # estimate: there, a shortfall of up to 5% of the file is no error.
            tolerated = self.format == "MP3" and count - got <= max(0.05 * self.frames, 4608)
            if not tolerated:
                raise AudioDecodeError(
                    self.path,
                    f"file is truncated: expected {count} frames from frame {start}, decoded {got}",
                )
            if got == 0:
                return np.zeros(0, np.float32)
        finite = np.isfinite(data)
        if not finite.all():
            self.nonfinite += int(data.size - np.count_nonzero(finite))
            data = np.where(finite, data, np.float32(0.0))
        return _downmix(data)


def _downmix(data):
    """Channel mean of float32 `[frames, channels]`, as `data.mean(axis=1)` in
    float32, bit for bit. NumPy's mean along the short axis of an interleaved
    array took 7 ms for a 10 s 44.1 kHz stereo clip, about as long as decoding
    it; column sums in channel order, then one division, give the same values
    (NumPy sums up to 7 channels in that order) in 0.2 ms."""
    channels = data.shape[1]
    if channels == 1:
        return np.ascontiguousarray(data[:, 0], dtype=np.float32)
    if channels >= 8:  # NumPy sums 8 or more values pairwise
        return np.ascontiguousarray(data.mean(axis=1, dtype=np.float32))
    mono = data[:, 0] + data[:, 1]
    for c in range(2, channels):
        mono += data[:, c]
    mono /= np.float32(channels)
    return mono


def _describe(err):
    text = str(err).strip() or type(err).__name__
    # soundfile prefixes "Error opening '<path>': "; the path is in our message already.
    return re.sub(r"^Error opening .*?: ", "", text)


def _resample(wave, orig_sr, target_sr):
    if orig_sr == target_sr or wave.size == 0:
        return wave
    import librosa  # noqa: PLC0415 (slow import, needed only when rates differ)

    out = librosa.resample(wave, orig_sr=orig_sr, target_sr=target_sr)
    return np.ascontiguousarray(out, dtype=np.float32)


def _window(reader, offset, duration):
    """Source frame range [lo, hi) for an offset/duration in seconds."""
    lo = int(round(float(offset) * reader.sample_rate))
    if lo >= reader.frames:
        raise AudioDecodeError(
            reader.path,
            f"offset {offset} s is past the end of the clip "
            f"({reader.frames / reader.sample_rate:.3f} s)",
        )
    if duration is None:
        return lo, reader.frames
    hi = min(reader.frames, lo + max(1, int(round(float(duration) * reader.sample_rate))))
    return lo, hi


def _check_load_args(sample_rate, offset, duration):
    if (
        isinstance(sample_rate, bool)
        or not isinstance(sample_rate, (int, np.integer))
        or sample_rate <= 0
    ):
        raise ValueError(f"`sample_rate` must be a positive integer; got {sample_rate!r}.")
    if not (math.isfinite(float(offset)) and float(offset) >= 0.0):
        raise ValueError(f"`offset` must be a finite number of seconds >= 0; got {offset!r}.")
    if duration is not None and not (math.isfinite(float(duration)) and float(duration) > 0.0):
        raise ValueError(
            f"`duration` must be None or a positive number of seconds; got {duration!r}."
        )


def _warn_nonfinite(path, count, stacklevel=3):
    if count:
        warnings.warn(
            f"'{path}': replaced {count} non-finite (NaN/inf) sample value(s) with 0.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


def load_audio(path, sample_rate=frontend.SAMPLE_RATE, offset=0.0, duration=None):
    """Decodes an audio file to a mono float32 waveform at `sample_rate`.

    Only the frames from `offset` to `offset + duration` are read from disk.
    Channels are averaged; the sample rate is converted with `librosa.resample`
    (soxr); NaN/inf samples are replaced with 0 (a `RuntimeWarning` names the file
    and the count); DC offset and clipping are kept as recorded.

    Args:
        path: the audio file.
        sample_rate: output rate in Hz (16,000 for BYOL-A).
        offset: start, in seconds from the beginning of the file.
        duration: length to read in seconds, or `None` for the rest of the file.

    Returns:
        A 1-D float32 NumPy array, finite, at least one sample long.

    Raises:
        AudioDecodeError: the file is missing, a directory, empty, truncated,
            corrupt or not audio, or `offset` is past its end. The message names
            the file and the reason.
        ValueError: an invalid argument.
    """
    _check_load_args(sample_rate, offset, duration)
    with _SourceReader(path) as reader:
        lo, hi = _window(reader, offset, duration)
        wave = reader.read(lo, hi)
        nonfinite = reader.nonfinite
        source_rate = reader.sample_rate
    if wave.size == 0:
        raise AudioDecodeError(path, "no audio samples could be decoded")
    wave = _resample(wave, source_rate, int(sample_rate))
    _warn_nonfinite(os.fspath(path), nonfinite)
    return wave


def audio_info(path):
    """`(sample_rate, frames, channels)` of an audio file without decoding it.

    Raises `AudioDecodeError` like `load_audio`.
    """
    with _SourceReader(path) as reader:
        return reader.sample_rate, reader.frames, reader.channels
