import keras

from byola_keras.models import _blocks, _init


@keras.saving.register_keras_serializable(package="byola_keras")
class AudioNTT2020(_blocks.AudioNTTBase):
    """The BYOL-A v1 encoder (AudioNTT2020), a functional Keras model.

    Three blocks of (Conv 3x3, 64 channels -> BatchNorm -> ReLU -> MaxPool 2x2),
    frames flattened to `64 * n_mels / 8` features, an MLP
    (Dense(d) -> ReLU -> Dropout(0.3) -> Dense(d) -> ReLU) per frame, then the
    clip embedding = max over time + mean over time. Any number of input frames
    is accepted; each max-pool floors, so trailing frames that do not fill a
    window are dropped. Frame embeddings `[B, frames // 8, d]` come from
    `encoder.frame_encoder` (shared weights).

    Trainable parameters: 600,192 (d=512), 1,649,792 (d=1024), 5,321,856
    (d=2048), as in the paper.

    Input shape:
        `(batch, n_mels, frames, 1)` normalized log-mel.

    Output shape:
        `(batch, d)` clip embeddings.

    Args:
        d: embedding size (512, 1024 or 2048 in the paper).
        n_mels: mel bins of the input (64); must be divisible by 8.
        dropout: dropout rate between the two dense layers (0.3).
        init: `"torch"` (default): PyTorch's default initialisation, as the
            official networks (conv and dense weights and biases uniform in
            +-1/sqrt(fan_in)); `"keras"`: Keras's defaults (Glorot-uniform
            weights, zero biases).
        name: model name.
        **kwargs: standard model arguments.

    Example:

    >>> encoder = AudioNTT2020(d=2048)
    >>> encoder(np.zeros((2, 64, 96, 1))).shape
    (2, 2048)
    >>> encoder.frame_encoder(np.zeros((2, 64, 101, 1))).shape
    (2, 12, 2048)

    References:
        - [Niizumi et al., BYOL for Audio, IJCNN 2021](https://arxiv.org/abs/2103.06695)
    """

    byola_version = "v1"  # which defaults.VERSION_DEFAULTS apply (e.g. probe patience)
    num_blocks = 3

    def __init__(self, d=512, n_mels=64, dropout=0.3, init="torch", name="audio_ntt2020", **kwargs):
        if n_mels % 8:
            raise ValueError(f"`n_mels` must be divisible by 8; got n_mels={n_mels}.")
        _init.check_init(init)
        inputs = keras.Input((n_mels, None, 1), name="log_mel")
        x = inputs
        for index in range(1, 4):
            x = _blocks.conv_block(x, index, init=init)
        x = _blocks.frames_from_maps(x, n_mels // 8)
        frames = _blocks.mlp(x, d, d, dropout=dropout, init=init)
        frames = keras.layers.Identity(name="frame_embeddings")(frames)
        embedding = _blocks.max_mean_pool(frames)
        super().__init__(inputs=inputs, outputs=embedding, name=name, **kwargs)
        self.d = int(d)
        self.n_mels = int(n_mels)
        self.dropout = float(dropout)
        self.init = init
