"""Run a `WaveformEncoder` on host log-mels of many lengths, a batch at a time.

Clips are grouped into buckets of similar length: a clip of `T` log-mel frames
runs zero-padded to `bucket(T)`, `T` rounded up to a multiple of a step that
grows with `T` (16 frames, or the largest power of two <= `T / 8`: 8 buckets
per doubling of the length, padding under 1/8 of a clip past 128 frames), so
an encoder compiled per shape (XLA on JAX) sees a few dozen shapes for a
corpus of any lengths instead of one per length. The padding
does not change the results: the encoder runs through
`models.length_masked.length_masked_encoder`, so each clip's embeddings equal
the encoder's on that clip alone (`WaveformEncoder.embed`), up to rounding.
An encoder without the AudioNTT layout runs unmasked and buckets are exact
lengths.

A batch holds up to `batch_size` clips and at most `MAX_BATCH_FRAMES` padded
frames. Rows are never padded: a smaller batch holds a power of two of clips
(`chunk_sizes`), so a bucket compiles for at most 1 + log2(`batch_size`) row
counts and no time is spent on empty rows.

A clip longer than `LONG_CLIP_FRAMES` frames (164 s) runs alone, in windows
of that many frames (one shape for every window of every long clip), so an
hour-long file needs no more memory than a batch. Each window starts on a
multiple of the encoder's time pooling and reads `4 * pooling` more frames on
each side; only the frame embeddings whose inputs all lie inside the window
are kept (an output frame depends on the log-mel frames within 7 of its
pooling window, through the three 3x3 convolutions), so the frames equal the
whole clip's, and the clip embedding is their max + mean.
"""

import numpy as np

from byola_keras.models.length_masked import exact_length_encoder, length_masked_encoder, masks_padding

# Log-mel frames (clips x padded length) in one encoder call: 16,384 frames
# (164 s of audio) keep the first convolution's output near 256 MiB.
MAX_BATCH_FRAMES = 16384
# Clips longer than this many frames run alone, in windows of this length.
LONG_CLIP_FRAMES = MAX_BATCH_FRAMES


class BatchEncoder:
    """Clip and frame embeddings of normalized log-mels `[n_mels, T]`, batched by bucket.

    Args:
        model: a `WaveformEncoder`.
        batch_size: most clips per encoder call.
        window_frames: clips longer than this run alone in windows of this many
            frames (default `LONG_CLIP_FRAMES`).
    """

    def __init__(self, model, batch_size, window_frames=None):
        encoder = model.encoder
        self.masked = masks_padding(encoder)
        self.net = length_masked_encoder(encoder) if self.masked else exact_length_encoder(encoder)
        self.batch_size = int(batch_size)
        self.n_mels = int(encoder.input.shape[1])
        self.frames_per_embedding = int(model.frames_per_embedding)
        per = self.frames_per_embedding
        window_frames = LONG_CLIP_FRAMES if window_frames is None else int(window_frames)
        self.window = max(per, window_frames // per * per)
        self.margin = 4 * per

    def is_long(self, frames):
        """Whether a clip of `frames` log-mel frames runs alone, in windows (`run_long`)."""
        return self.masked and int(frames) > self.window

    def run_long(self, log_mel):
        """`(clip [d], frames [T', d])` of one long clip, computed window by window."""
        per, total = self.frames_per_embedding, log_mel.shape[1]
        count = self.embedded_frames(total)
        width = self.window + 2 * self.margin
        pieces = []
        for start in range(0, count * per, self.window):
            lo, hi = max(0, start - self.margin), min(total, start + self.window + self.margin)
            x = np.zeros((1, self.n_mels, width, 1), np.float32)
            x[0, :, : hi - lo, 0] = log_mel[:, lo:hi]
            out = self.net.predict_on_batch([x, np.array([hi - lo], np.int32)])
            first, last = start // per, min(count, (start + self.window) // per)
            pieces.append(np.asarray(out["frame_embeddings"], np.float32)[0, first - lo // per : last - lo // per])
        frames = np.concatenate(pieces)
        clip = frames.max(axis=0) + frames.mean(axis=0, dtype=np.float64).astype(np.float32)
        return clip, frames

    def bucket(self, frames):
        """The padded length a clip of `frames` log-mel frames runs at."""
        if not self.masked:
            return int(frames)
        step = max(16, 1 << max(0, int(frames).bit_length() - 4))
        return -(-int(frames) // step) * step

    def rows(self, bucket):
        """Clips per full batch of a bucket."""
        return max(1, min(self.batch_size, MAX_BATCH_FRAMES // int(bucket)))

    def chunk_sizes(self, bucket, count):
        """How `count` clips of a bucket are split into batches: full batches, then
        powers of two (11 clips, batches of 32: 8, 2, 1)."""
        full, sizes = self.rows(bucket), []
        while count:
            size = full if count >= full else 1 << (count.bit_length() - 1)
            sizes.append(size)
            count -= size
        return sizes

    def run(self, log_mels, bucket):
        """`(clip [n, d], [frames_i [T'_i, d]])` of one batch of log-mels of one bucket."""
        count = len(log_mels)
        x = np.zeros((count, self.n_mels, bucket, 1), np.float32)
        lengths = np.full(count, bucket, np.int32)
        for i, log_mel in enumerate(log_mels):
            x[i, :, : log_mel.shape[1], 0] = log_mel
            lengths[i] = log_mel.shape[1]
        out = self.net.predict_on_batch([x, lengths])
        clip = np.asarray(out["embedding"], np.float32)
        frames = np.asarray(out["frame_embeddings"], np.float32)
        if not self.masked:
            return clip, [frames[i] for i in range(count)]
        per_row = [frames[i, : self.embedded_frames(int(lengths[i]))] for i in range(count)]
        return clip, per_row

    def embedded_frames(self, frames):
        """Frame embeddings of a clip of `frames` log-mel frames (each max-pool floors)."""
        for _ in range(self.frames_per_embedding.bit_length() - 1):
            frames //= 2
        return frames
