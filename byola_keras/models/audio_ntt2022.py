import keras

from byola_keras.models import _blocks, _init


@keras.saving.register_keras_serializable(package="byola_keras")
class AudioNTT2022(_blocks.AudioNTTBase):
    """The BYOL-A v2 encoder (AudioNTT2022), a functional Keras model.

    Two blocks of (Conv 3x3, 64 channels -> BatchNorm -> ReLU -> MaxPool 2x2)
    give `64 * n_mels / 4` local features per frame (1,024 for 64 mels); an MLP
    (Dense -> ReLU -> Dropout(0.3) -> Dense -> ReLU, width `d - 1024`) gives
    global features; each frame is `[local | global]` (`d` features, 3,072 by
    default) and the clip embedding is max over time + mean over time. Frame
    embeddings `[B, frames // 4, d]` come from `encoder.frame_encoder`.

    Trainable parameters: 6,333,376 for the default `d=3072`.

    Input shape:
        `(batch, n_mels, frames, 1)` normalized log-mel.

    Output shape:
        `(batch, d)` clip embeddings.

    Args:
        d: frame/clip embedding size: the 1,024 local features plus the MLP
            width (3,072 in the paper, whose file is named "d2048" after the MLP).
        n_mels: mel bins of the input (64); must be divisible by 4.
        dropout: dropout rate between the two dense layers (0.3).
        init: `"torch"` (default): PyTorch's default initialisation, as the
            official networks (conv and dense weights and biases uniform in
            +-1/sqrt(fan_in)); `"keras"`: Keras's defaults (Glorot-uniform
            weights, zero biases).
        name: model name.
        **kwargs: standard model arguments.

    Example:

    >>> encoder = AudioNTT2022()
    >>> encoder(np.zeros((2, 64, 96, 1))).shape
    (2, 3072)

    References:
        - [Niizumi et al., BYOL for Audio: Exploring Pre-trained
          General-purpose Audio Representations, TASLP 2023](https://arxiv.org/abs/2204.07402)
    """

    byola_version = "v2"  # which defaults.VERSION_DEFAULTS apply (e.g. probe patience)
    num_blocks = 2

    def __init__(self, d=3072, n_mels=64, dropout=0.3, init="torch", name="audio_ntt2022", **kwargs):
        if n_mels % 4:
            raise ValueError(f"`n_mels` must be divisible by 4; got n_mels={n_mels}.")
        local_dim = 64 * (n_mels // 4)
        if d <= local_dim:
            raise ValueError(f"`d` must exceed the {local_dim} local features; got d={d}.")
        _init.check_init(init)
        inputs = keras.Input((n_mels, None, 1), name="log_mel")
        x = inputs
        for index in range(1, 3):
            x = _blocks.conv_block(x, index, init=init)
        local = _blocks.frames_from_maps(x, n_mels // 4)
        global_ = _blocks.mlp(local, d - local_dim, d - local_dim, dropout=dropout, init=init)
        frames = keras.layers.Concatenate(axis=-1, name="frame_embeddings")([local, global_])
        embedding = _blocks.max_mean_pool(frames)
        super().__init__(inputs=inputs, outputs=embedding, name=name, **kwargs)
        self.d = int(d)
        self.n_mels = int(n_mels)
        self.dropout = float(dropout)
        self.init = init
