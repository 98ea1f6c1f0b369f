import keras
from keras import ops

from byola_keras import defaults as defaults_lib
from byola_keras.layers.log_mixup_exp import LogMixupExp
from byola_keras.layers.post_norm import PostNorm
from byola_keras.layers.pre_norm import PreNorm
from byola_keras.layers.random_linear_fader import RandomLinearFader
from byola_keras.layers.random_resize_crop import RandomResizeCrop

_COMMON = defaults_lib.COMMON_DEFAULTS


def _seed(seed, offset):
    return None if seed is None else int(seed) + offset


@keras.saving.register_keras_serializable(package="byola_keras")
class AugmentationModule(keras.layers.Layer):
    """The BYOL-A augmentation module: two augmented views of each segment.

    Pre-Normalization -> LogMixupExp -> RandomResizeCrop -> (v2:
    RandomLinearFader) -> Post-Normalization, in that order. Both views are
    drawn independently from the same distribution; they are computed as one
    batch of `2 B`, so Post-Normalization sees both views together (as in the
    official code) and the memory bank receives each segment once.

    Input shape:
        `(batch, n_mels, frames, 1)` log-mel segments (64 x 96 in the papers).

    Output shape:
        A tuple of two tensors of the input's shape; with `training=False`,
        `(inputs, inputs)`.

    Args:
        version: `"v1"` (alpha 0.4, no fader) or `"v2"` (alpha 0.2, fader
            gain 1.0); sets the defaults of `alpha` and `fader_gain`.
        mean, std: Pre-Normalization statistics (or `adapt()` later).
        alpha: mixup strength; 0 turns mixup off.
        memory_size: mixup memory bank size.
        virtual_crop_scale, freq_scale, time_scale: RandomResizeCrop ranges.
        fader_gain: RandomLinearFader gain; `None` or 0 turns it off.
        use_pre_norm, use_mixup, use_resize_crop, use_post_norm: switch blocks
            off for ablations (the paper's Table II).
        seed: integer seed; each block gets its own derived seed.
        **kwargs: standard layer arguments; `dtype` defaults to `"float32"`
            whatever the global policy (the views are cast by the encoder).

    Example:

    >>> aug = AugmentationModule(version="v1", mean=-5.5, std=5.0, seed=0)
    >>> view1, view2 = aug(x, training=True)

    References:
        - [Niizumi et al., BYOL for Audio, IJCNN 2021](https://arxiv.org/abs/2103.06695)
        - [Niizumi et al., BYOL for Audio: Exploring Pre-trained
          General-purpose Audio Representations, TASLP 2023](https://arxiv.org/abs/2204.07402)
    """

    def __init__(
        self,
        version="v1",
        mean=None,
        std=None,
        alpha=None,
        memory_size=_COMMON["memory_size"],
        virtual_crop_scale=_COMMON["virtual_crop_scale"],
        freq_scale=_COMMON["freq_scale"],
        time_scale=_COMMON["time_scale"],
        fader_gain="default",
        use_pre_norm=True,
        use_mixup=True,
        use_resize_crop=True,
        use_post_norm=True,
        seed=None,
        **kwargs,
    ):
        # float32 unless told otherwise, also under a mixed-precision policy:
        # every Keras layer casts its inputs to its compute dtype, and
        # float16/bfloat16 would round the log-mels before the exp/log and
        # normalization maths (the encoder casts the views itself).
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if version not in defaults_lib.VERSIONS:
            raise ValueError(f"`version` must be 'v1' or 'v2'; got version={version!r}.")
        defaults = defaults_lib.VERSION_DEFAULTS[version]
        self.version = version
        self.alpha = float(defaults["alpha"] if alpha is None else alpha)
        self.fader_gain = defaults["fader_gain"] if fader_gain == "default" else fader_gain
        self.memory_size = int(memory_size)
        self.virtual_crop_scale = tuple(virtual_crop_scale)
        self.freq_scale = tuple(freq_scale)
        self.time_scale = tuple(time_scale)
        self.use_pre_norm = bool(use_pre_norm)
        self.use_mixup = bool(use_mixup) and self.alpha > 0.0
        self.use_resize_crop = bool(use_resize_crop)
        self.use_post_norm = bool(use_post_norm)
        self.seed = seed
        self.pre_norm = PreNorm(mean=mean, std=std, dtype=self.dtype_policy, name="pre_norm")
        self.mixup = LogMixupExp(
            alpha=self.alpha,
            memory_size=self.memory_size,
            seed=_seed(seed, 1),
            dtype=self.dtype_policy,
            name="mixup",
        )
        self.resize_crop = RandomResizeCrop(
            virtual_crop_scale=self.virtual_crop_scale,
            freq_scale=self.freq_scale,
            time_scale=self.time_scale,
            seed=_seed(seed, 2),
            dtype=self.dtype_policy,
            name="resize_crop",
        )
        self.fader = (
            RandomLinearFader(
                gain=self.fader_gain, seed=_seed(seed, 3), dtype=self.dtype_policy, name="fader"
            )
            if self.fader_gain
            else None
        )
        self.post_norm = PostNorm(dtype=self.dtype_policy, name="post_norm")

    def build(self, input_shape):
        if self.use_mixup and not self.mixup.built:
            self.mixup.build(input_shape)
        self.built = True

    def adapt(self, data, steps=None):
        """Set the Pre-Normalization statistics from log-mel data."""
        self.pre_norm.adapt(data, steps=steps)

    def call(self, inputs, training=False):
        if not training:
            return inputs, inputs
        x = self.pre_norm(inputs, training=True) if self.use_pre_norm else inputs
        if self.use_mixup:
            views = self.mixup(x, training=True, views=2)  # each segment enters the bank once
        else:
            views = ops.concatenate([x, x], axis=0)
        if self.use_resize_crop:
            views = self.resize_crop(views, training=True)
        if self.fader is not None:
            views = self.fader(views, training=True)
        if self.use_post_norm:
            views = self.post_norm(views, training=True)
        view1, view2 = ops.split(views, 2, axis=0)
        return view1, view2

    def compute_output_shape(self, input_shape):
        return input_shape, input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "version": self.version,
            "mean": self.pre_norm.mean,
            "std": self.pre_norm.std,
            "alpha": self.alpha,
            "memory_size": self.memory_size,
            "virtual_crop_scale": self.virtual_crop_scale,
            "freq_scale": self.freq_scale,
            "time_scale": self.time_scale,
            "fader_gain": self.fader_gain,
            "use_pre_norm": self.use_pre_norm,
            "use_mixup": self.use_mixup,
            "use_resize_crop": self.use_resize_crop,
            "use_post_norm": self.use_post_norm,
            "seed": self.seed,
        }
