"""An AudioNTT encoder that runs zero-padded log-mels of different lengths as if each were alone.

`length_masked_encoder(encoder)` returns a Keras model sharing the encoder's
layers: `[log_mel [B, n_mels, T, 1], frames [B]] -> {"embedding": [B, d],
"frame_embeddings": [B, T >> num_blocks, d]}`, where row `b` holds a clip of
`frames[b]` log-mel frames followed by padding. Padding at the end of a clip
changes an ordinary forward pass in two ways: each 3x3 convolution near the
clip's end sees padded frames where the clip alone sees its "same" zero
padding, and the clip embedding (max + mean over time) would pool padded frames.
Here the time steps past the clip's length are set to 0 before each
convolution block (the length halves at each 2x2 max-pool, which floors as in
the plain encoder) and the max and the mean run over the clip's own frames
only. Every layer between the convolutions (BatchNorm in inference mode, ReLU,
pooling windows inside the clip) and after them (the per-frame MLP) works on
each time step on its own, so each row's outputs equal the encoder's on that
clip alone, up to floating-point rounding. Frame embeddings past a row's
`frames >> num_blocks` are padding: drop them.

This holds for the AudioNTT encoders (`AudioNTT2020`, `AudioNTT2022`: conv
blocks named `conv{i}`, `bn{i}`, `relu{i}`, `pool{i}`, then per-frame layers up
to `frame_embeddings`). `masks_padding(encoder)` says whether an encoder has
that layout; for any other encoder `exact_length_encoder` gives the same
interface without masking, and callers must batch only clips of equal length.
"""

import keras
from keras import ops


def _valid_steps(lengths, steps):
    """`[B, steps]` booleans: time step < the row's length."""
    return ops.arange(steps)[None, :] < ops.cast(lengths, "int32")[:, None]


class _ZeroPastLength(keras.layers.Layer):
    """`[B, F, T, C]`, lengths `[B]` -> the input with time steps >= length set to 0."""

    def call(self, inputs, lengths):
        valid = _valid_steps(lengths, ops.shape(inputs)[2])
        return inputs * ops.cast(valid, inputs.dtype)[:, None, :, None]

    def compute_output_shape(self, inputs_shape, lengths_shape):
        return inputs_shape


class _MaxPlusMeanOverLength(keras.layers.Layer):
    """`[B, T, d]`, lengths `[B]` -> max + mean over each row's first `length` steps."""

    def call(self, frames, lengths):
        valid = _valid_steps(lengths, ops.shape(frames)[1])[:, :, None]
        lowest = ops.full_like(frames, float("-inf"))
        largest = ops.max(ops.where(valid, frames, lowest), axis=1)
        total = ops.sum(ops.where(valid, frames, ops.zeros_like(frames)), axis=1)
        count = ops.maximum(ops.cast(lengths, frames.dtype), 1.0)[:, None]
        return largest + total / count

    def compute_output_shape(self, frames_shape, lengths_shape):
        return (frames_shape[0], frames_shape[2])


def masks_padding(encoder):
    """Whether `length_masked_encoder` supports `encoder` (the AudioNTT layout)."""
    blocks = getattr(encoder, "num_blocks", None)
    if not isinstance(blocks, int) or blocks < 1:
        return False
    names = {layer.name for layer in getattr(encoder, "layers", [])}
    wanted = {f"{kind}{i}" for i in range(1, blocks + 1) for kind in ("conv", "bn", "relu", "pool")}
    return wanted <= names and {"frame_embeddings", "embedding"} <= names


def length_masked_encoder(encoder):
    """The model described in the module docstring (shares `encoder`'s weights).

    Args:
        encoder: an `AudioNTT2020` or `AudioNTT2022` (see `masks_padding`).

    Returns:
        A Keras model `[log_mel, frames] -> {"embedding", "frame_embeddings"}`.
    """
    if not masks_padding(encoder):
        raise ValueError(
            f"{type(encoder).__name__} does not have the AudioNTT layout (conv/bn/relu/pool blocks "
            "then per-frame layers); batch only clips of equal length (`exact_length_encoder`)."
        )
    log_mel = keras.Input(tuple(encoder.input.shape[1:]), name="log_mel")
    frames = keras.Input((), dtype="int32", name="frames")
    x, length = log_mel, frames
    for i in range(1, encoder.num_blocks + 1):
        x = _ZeroPastLength(name=f"zero_past_length{i}")(x, length)
        for kind in ("conv", "bn", "relu", "pool"):
            x = encoder.get_layer(f"{kind}{i}")(x)
        length = length // 2
    last_pool = encoder.get_layer(f"pool{encoder.num_blocks}").output
    per_frame = keras.Model(last_pool, encoder.get_layer("frame_embeddings").output, name="per_frame")
    frame_embeddings = per_frame(x)
    embedding = _MaxPlusMeanOverLength(name="embedding")(frame_embeddings, length)
    return keras.Model(
        [log_mel, frames],
        {"embedding": embedding, "frame_embeddings": frame_embeddings},
        name=f"{encoder.name}_length_masked",
    )


def exact_length_encoder(encoder):
    """`[log_mel, frames] -> {"embedding", "frame_embeddings"}` for any encoder with a
    `frame_embeddings` layer; `frames` is ignored, so every row must be a whole clip."""
    log_mel = keras.Input(tuple(encoder.input.shape[1:]), name="log_mel")
    frames = keras.Input((), dtype="int32", name="frames")
    both = keras.Model(encoder.input, [encoder.output, encoder.get_layer("frame_embeddings").output])
    embedding, frame_embeddings = both(log_mel)
    return keras.Model(
        [log_mel, frames],
        {"embedding": embedding, "frame_embeddings": frame_embeddings},
        name=f"{encoder.name}_exact_length",
    )
