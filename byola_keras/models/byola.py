import math

import keras
from keras import ops

from byola_keras import defaults, distribute
from byola_keras.layers.augmentation_module import AugmentationModule
from byola_keras.models._blocks import BN_EPSILON, BN_MOMENTUM
from byola_keras.backend.conv import batch_normalization
from byola_keras.backend.train_step import EMATrainStep
from byola_keras.models._init import check_init, layer_initializers

BATCHNORMS = ("per_view", "joint")


def mlp_head(hidden, out, name, in_dim, init="torch"):
    """BYOL projector / predictor: Linear(hidden) -> BatchNorm -> ReLU -> Linear(out).

    The BatchNormalization is the backend's tuned one (`byola_keras.backend.conv`).

    `in_dim` is the size of its input (the fan-in of the first layer);
    `init` is `"torch"` or `"keras"` initialisation."""
    return keras.Sequential(
        [
            keras.layers.Dense(hidden, name=f"{name}_dense1", **layer_initializers(init, in_dim)),
            batch_normalization()(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn"),
            keras.layers.ReLU(name=f"{name}_relu"),
            keras.layers.Dense(out, name=f"{name}_dense2", **layer_initializers(init, hidden)),
        ],
        name=name,
    )


@keras.saving.register_keras_serializable(package="byola_keras")
class OnlineNetwork(keras.layers.Layer):
    """Encoder followed by the projector: the part of BYOL that has a target twin."""

    def __init__(self, encoder, projector, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.projector = projector

    def build(self, input_shape):
        self.projector.build((None, self.encoder.output.shape[-1]))
        self.built = True

    def call(self, inputs, training=False):
        return self.projector(self.encoder(inputs, training=training), training=training)


def _l2_normalize(x):
    x = ops.cast(x, "float32")
    return x / ops.maximum(ops.norm(x, axis=-1, keepdims=True), 1e-12)


def byol_loss_per_sample(prediction, target):
    """`2 - 2 cos(prediction, target)` for each row: BYOL's loss of one view's
    prediction against the other view's target projection."""
    return 2.0 - 2.0 * ops.sum(_l2_normalize(prediction) * _l2_normalize(target), axis=-1)


def _plus_losses(loss, losses):
    """`loss` plus each of the layers' `losses` (a list of scalars, added one
    by one: `ops.sum` of the list fails under jax.jit)."""
    for extra in losses:
        loss = loss + ops.cast(extra, loss.dtype)
    return loss


@keras.saving.register_keras_serializable(package="byola_keras")
class BYOLA(EMATrainStep, keras.Model):
    """BYOL for Audio: self-supervised pretraining of an audio encoder.

    Owns the augmentation module (two views of each log-mel segment), the online
    network (encoder -> projector -> predictor) and an exponential-moving-average
    target (encoder -> projector). The loss is BYOL's `2 - 2 cos(q(z1), z2')`
    symmetrized over the two views, with gradients only into the online network.
    After every optimizer step the target weights move towards the online ones,
    `xi <- tau xi + (1 - tau) theta` (weights only; BatchNorm moving statistics
    are not averaged). The target runs with batch statistics like the online
    network: its weights are evaluated through the online graph in training mode
    (`stateless_call`) under `stop_gradient`.

    As in the official code, each view goes through the online network, the
    predictor and the target in a call of its own (`batchnorm="per_view"`):
    every BatchNorm normalizes over the B samples of one view, and the online
    moving statistics are updated twice per step (view 1, then view 2). On
    PyTorch and TensorFlow the training step then runs each view's backward
    pass before the other view's forward pass (`uses_per_view_backward`), so
    one view's activations are held at a time. With
    `batchnorm="joint"` both views go through each network as one 2B batch.
    The augmentation module computes both views as one 2B batch in either case
    (Post-Normalization over both views, one memory-bank entry per segment).

    Train it with `compile()` and `fit()` on batches of log-mel segments
    `[B, n_mels, frames, 1]` (no labels). The encoder is what is kept:
    `model.encoder`, with the pre-normalization statistics `model.mean`,
    `model.std`.

    Args:
        encoder: a Keras model mapping `[B, n_mels, frames, 1]` to `[B, d]`
            (`AudioNTT2020(d=...)` for v1, `AudioNTT2022()` for v2).
        version: `"v1"` (mixup alpha 0.4, no fader) or `"v2"` (alpha 0.2, random
            linear fader); sets augmentation defaults.
        mean, std: pre-normalization statistics, or `None` and `adapt()`.
        tau: target decay rate (0.99).
        projection_hidden, projection_dim: projector/predictor sizes (4,096, 256).
        batchnorm: `"per_view"` (default, official) or `"joint"` (see above).
        init: initialisation of the projector and predictor: `"torch"`
            (default, PyTorch's, as the official code) or `"keras"`. The
            encoder's is set when it is built (`AudioNTT2020(init=...)`).
        input_shape: shape of one segment (64, 96, 1).
        seed: integer seed of the augmentation module.
        augmentation: an `AugmentationModule` to use instead of one built from
            the remaining keyword arguments.
        **augmentation_kwargs: `alpha`, `memory_size`, `virtual_crop_scale`,
            `freq_scale`, `time_scale`, `fader_gain`, `use_pre_norm`,
            `use_mixup`, `use_resize_crop`, `use_post_norm` (see
            `AugmentationModule`); other keyword arguments go to `keras.Model`.

    Example:

    ```python
    model = BYOLA(encoder=AudioNTT2020(d=2048), version="v1")
    model.adapt(log_mel_segments)  # or BYOLA(..., mean=-5.49, std=5.04)
    model.compile(optimizer=keras.optimizers.Adam(3e-4, epsilon=1e-8))
    model.fit(log_mel_segments, batch_size=256, epochs=100)
    model.encoder.save("encoder.keras")
    ```

    References:
        - [Niizumi et al., BYOL for Audio, IJCNN 2021](https://arxiv.org/abs/2103.06695)
        - [Niizumi et al., BYOL for Audio: Exploring Pre-trained
          General-purpose Audio Representations, TASLP 2023](https://arxiv.org/abs/2204.07402)
        - [Grill et al., Bootstrap Your Own Latent, NeurIPS 2020](https://arxiv.org/abs/2006.07733)
    """

    _AUGMENTATION_KEYS = (
        "alpha",
        "memory_size",
        "virtual_crop_scale",
        "freq_scale",
        "time_scale",
        "fader_gain",
        "use_pre_norm",
        "use_mixup",
        "use_resize_crop",
        "use_post_norm",
    )

    def __init__(
        self,
        encoder,
        version="v1",
        mean=None,
        std=None,
        tau=defaults.COMMON_DEFAULTS["tau"],
        projection_hidden=defaults.COMMON_DEFAULTS["projection_hidden"],
        projection_dim=defaults.COMMON_DEFAULTS["projection_dim"],
        input_shape=(64, 96, 1),
        seed=None,
        augmentation=None,
        batchnorm="per_view",
        init="torch",
        **kwargs,
    ):
        augmentation_kwargs = {k: kwargs.pop(k) for k in self._AUGMENTATION_KEYS if k in kwargs}
        super().__init__(**kwargs)
        if not 0.0 <= float(tau) <= 1.0:
            raise ValueError(f"`tau` must be in [0, 1]; got tau={tau}.")
        if batchnorm not in BATCHNORMS:
            raise ValueError(f"`batchnorm` must be one of {BATCHNORMS}; got batchnorm={batchnorm!r}.")
        self.batchnorm = batchnorm
        self.init = check_init(init)
        self.version = version
        self.tau = float(tau)
        self.projection_hidden = int(projection_hidden)
        self.projection_dim = int(projection_dim)
        self.segment_shape = tuple(int(s) for s in input_shape)
        self.seed = seed
        if augmentation is None:
            augmentation = AugmentationModule(
                version=version, mean=mean, std=std, seed=seed, name="augmentation",
                **augmentation_kwargs,
            )
        elif augmentation_kwargs or mean is not None:
            raise ValueError("Give either `augmentation` or augmentation arguments, not both.")
        self.augmentation = augmentation
        head = dict(hidden=self.projection_hidden, out=self.projection_dim, init=init)
        self.online_network = OnlineNetwork(
            encoder,
            mlp_head(name="projector", in_dim=int(encoder.output.shape[-1]), **head),
            name="online_network",
        )
        self.predictor = mlp_head(name="predictor", in_dim=self.projection_dim, **head)
        self.embedding_spread = keras.metrics.Mean(name="embedding_spread")

        batch_shape = (None, *self.segment_shape)
        for layer, shape in (
            (self.augmentation, batch_shape),
            (self.online_network, batch_shape),
            (self.predictor, (None, self.projection_dim)),
        ):
            if not layer.built:
                layer.build(shape)
        self.target_variables = [
            self.add_weight(
                shape=v.shape,
                initializer=(lambda shape, dtype, v=v: ops.copy(v.value)),
                dtype=v.dtype,
                trainable=False,
                aggregation="only_first_replica",
                name=f"target_{v.name}",
            )
            for v in self.online_network.trainable_variables
        ]
        self.built = True

    # -- the parts users keep -------------------------------------------------------
    @property
    def encoder(self):
        """The online encoder (what BYOL-A pretraining is for)."""
        return self.online_network.encoder

    @property
    def mean(self):
        return self.augmentation.pre_norm.mean

    @property
    def std(self):
        return self.augmentation.pre_norm.std

    def adapt(self, data, steps=None):
        """Set the pre-normalization statistics from log-mel data (array or batches)."""
        self.augmentation.adapt(data, steps=steps)

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`; refuses to train without pre-normalization statistics."""
        augmentation = self.augmentation
        if augmentation.use_pre_norm and augmentation.pre_norm.mean is None:
            raise ValueError(
                "BYOLA has no pre-normalization statistics: pass `mean=` and `std=` to BYOLA, "
                "or call `model.adapt(log_mels)` before `fit()` (or set use_pre_norm=False)."
            )
        return super().fit(*args, **kwargs)

    # -- forward, loss, target update ------------------------------------------------
    def call(self, inputs, training=False):
        view1, view2 = self.augmentation(inputs, training=training)
        return self.forward_views(view1, view2, training=training)

    def forward_views(self, view1, view2, training=False):
        """Online projections, predictions and target projections of two views.

        Returns a dict of `[2B, projection_dim]` tensors, view 1's rows first:
        `"projection"` (online), `"prediction"` (predictor of it) and
        `"target"` (the target network, stop-gradient)."""
        if self.batchnorm == "joint":
            views = [ops.concatenate([view1, view2], axis=0)]
        else:  # the official forward: one call per view and network
            views = [view1, view2]
        projections = [self.online_network(v, training=training) for v in views]
        predictions = [self.predictor(p, training=training) for p in projections]
        targets = self._target_projections(views, training=training)

        def join(parts):
            return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=0)

        return {
            "prediction": join(predictions),
            "target": join(targets),
            "projection": join(projections),
        }

    def _target_projections(self, views, training):
        """The target network (the online graph with the target weights) on each
        of `views`, one call each."""
        network = self.online_network
        non_trainable = network.non_trainable_variables
        trainable_values = [v.value for v in self.target_variables]
        state = [v.value for v in non_trainable]
        outputs = []
        for view in views:
            output, state = network.stateless_call(trainable_values, state, view, training=training)
            outputs.append(ops.stop_gradient(output))
        # Keep the target's draws of randomness (dropout) independent of the
        # online network's next step; its BatchNorm moving statistics are unused.
        for variable, value in zip(non_trainable, state):
            if variable.name == "seed_generator_state":
                variable.assign(value)
        return outputs

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        p1, p2 = ops.split(y_pred["prediction"], 2, axis=0)
        z1, z2 = ops.split(y_pred["target"], 2, axis=0)
        per_sample = byol_loss_per_sample(p1, z2) + byol_loss_per_sample(p2, z1)
        loss = _plus_losses(ops.mean(per_sample), self.losses)  # regularizers, `add_loss`
        # Under tf.distribute, the replicas' gradients are summed: divide by
        # their number, as Keras's built-in losses do.
        return distribute.scale_loss_for_replicas(loss)

    # -- the step one view at a time (used by `backend.train_step`) ------------------
    per_view_backward = True

    def uses_per_view_backward(self):
        """Whether a training step runs each view's backward pass before the
        other view's forward pass, so that the activations of one view are held
        at a time (PyTorch and TensorFlow; `byola_keras.backend.train_step`).

        The loss is a sum of one term per view, and with per-view BatchNorm a
        view's term depends on the online weights through that view's forward
        pass alone, so the gradient is the sum of the two views' gradients.
        It holds with `batchnorm="per_view"` and no weight or activity
        regularizers (their losses are not per view); otherwise, or with
        `per_view_backward = False`, the step is Keras's."""
        if not self.per_view_backward or self.batchnorm != "per_view":
            return False
        if any(getattr(v, "regularizer", None) is not None for v in self.trainable_variables):
            return False
        return not any(
            getattr(layer, "activity_regularizer", None) is not None
            for layer in self._flatten_layers(include_self=False, recursive=True)
        )

    def views_and_targets(self, x):
        """The two augmented views of a batch and their target projections
        (stop-gradient), for a step one view at a time. The target runs before
        the online network here, so its dropout draws come first."""
        views = list(self.augmentation(x, training=True))
        return views, self._target_projections(views, training=True)

    def online_view_loss(self, view, other_target):
        """One view through the online network and the predictor, and BYOL's
        loss term of its prediction against the other view's target projection
        (the mean over the batch, divided by the replicas like `compute_loss`).
        Returns `(loss, projection, prediction)`; the two views' terms add up to
        `compute_loss`. Losses added by layers during this view's pass
        (`add_loss`) are part of its term."""
        projection = self.online_network(view, training=True)
        prediction = self.predictor(projection, training=True)
        loss = _plus_losses(
            ops.mean(byol_loss_per_sample(prediction, other_target)),
            self.online_network.losses + self.predictor.losses,
        )
        return distribute.scale_loss_for_replicas(loss), projection, prediction

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Collapse monitor: spread across the batch of the normalized online
        # projections, scaled so that isotropic embeddings give about 1 and a
        # collapsed representation gives 0.
        z = _l2_normalize(y_pred["projection"])
        spread = ops.mean(ops.std(z, axis=0)) * math.sqrt(self.projection_dim)
        self.embedding_spread.update_state(spread)
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def update_target(self):
        """`xi <- tau xi + (1 - tau) theta` for every target weight."""
        online = self.online_network.trainable_variables
        for target, source in zip(self.target_variables, online):
            target.assign(
                ops.add(
                    ops.multiply(target.value, self.tau),
                    ops.multiply(ops.cast(source.value, target.dtype), 1.0 - self.tau),
                )
            )

    # -- serialization ---------------------------------------------------------------
    def get_config(self):
        config = {
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "augmentation": keras.saving.serialize_keras_object(self.augmentation),
            "version": self.version,
            "tau": self.tau,
            "projection_hidden": self.projection_hidden,
            "projection_dim": self.projection_dim,
            "input_shape": self.segment_shape,
            "seed": self.seed,
            "batchnorm": self.batchnorm,
            "init": self.init,
            "name": self.name,
        }
        return config

    @classmethod
    def from_config(cls, config):
        # Configs written before `batchnorm` / `init` existed describe learners
        # that ran both views as one batch and used Keras's initialisation: a
        # resumed run goes on as it started.
        config = {"batchnorm": "joint", "init": "keras", **config}
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        config["augmentation"] = keras.saving.deserialize_keras_object(config["augmentation"])
        return cls(**config)
