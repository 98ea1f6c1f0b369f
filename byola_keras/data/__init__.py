"""Audio in, log-mel segments out: the data pipeline of BYOL-A pretraining.

    files = find_audio_files("audio/")            # or read_manifest("manifest.csv")
    cache = LogMelCache.build(files, "cache/")    # decode once, sharded on disk
    mean, std = compute_norm_stats(cache)         # Pre-Normalization statistics
    data = SegmentDataset(cache, batch_size=256)  # random 96-frame segments
    learner.fit(data, epochs=100, shuffle=False)

Everything here runs on the host with NumPy, soundfile and librosa (no
TensorFlow); `SegmentDataset` is a `keras.utils.PyDataset`, so it feeds `fit` on
every backend. `make_default_corpus()` synthesises a small corpus when no audio
is at hand.
"""

from byola_keras.data.audio import (
    AUDIO_EXTENSIONS,
    AudioDecodeError,
    audio_info,
    find_audio_files,
    load_audio,
)
from byola_keras.data.cache import LogMelCache, clip_log_mel, compute_norm_stats
from byola_keras.data.dataset import SegmentDataset
from byola_keras.data.default_corpus import make_default_corpus
from byola_keras.data.manifest import read_manifest

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioDecodeError",
    "LogMelCache",
    "SegmentDataset",
    "audio_info",
    "clip_log_mel",
    "compute_norm_stats",
    "find_audio_files",
    "load_audio",
    "make_default_corpus",
    "read_manifest",
]
