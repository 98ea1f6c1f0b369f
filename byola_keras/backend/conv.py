"""Backend-tuned versions of the conv-block layers (Conv2D, BatchNormalization,
MaxPooling2D) of the AudioNTT encoders; chosen once, by `conv_block_layers()`.

They are the Keras layers (same constructor, weights, config, outputs;
`isinstance` holds), with a faster `call` where one backend needs it. Each
keeps its parent's class name, because `.keras` files name weights after
layer classes: a file saved on one backend loads on the others. Off their
backend they run the parent's `call`.

- JAX: `MaxPool2x2` pools with elementwise maxima of each window's four
  values and a hand-written gradient (`jax_pool`). XLA differentiates
  reduce-window max with select-and-scatter, which XLA:CPU runs about 4x
  slower than an elementwise gradient (a third of the encoder's backward
  pass). `JaxConv2D` computes its kernel gradient either
  as XLA's transposed convolution or as matrix products of image patches,
  whichever measured faster on this machine for the shapes at hand
  (`jax_conv`, `autotune`): on some CPUs XLA's kernel gradient of a 64-channel
  3x3 convolution takes several times its forward pass.
  `JaxBatchNormalization` normalizes in training with a hand-written
  gradient (`jax_batch_norm`) that keeps only its input for the backward
  pass, where automatic differentiation kept the centred values as well: one
  activation-sized buffer less per block and view in the step's memory.
- PyTorch: Keras's channels-last layers copy every activation to
  channels-first and back around each conv and pool, and Keras's generic
  batch normalization is several elementwise passes in forward and backward.
  `TorchConv2D`, `TorchBatchNormalization` and `TorchMaxPooling2D` keep the
  channels-last interface and hand `torch.nn.functional`'s native kernels a
  channels-first *view* of the same memory (torch's `channels_last` memory
  format, which its CPU conv, batch-norm and pooling kernels prefer): no
  copies, one fused batch-norm kernel (the encoder's forward and backward
  about 2x faster on CPU).
- TensorFlow: `TFBatchNormalization` runs TensorFlow's fused batch-norm
  kernel (`FusedBatchNormV3` and its gradient kernel) instead of Keras's
  separate moments, normalization and gradient ops; convolution and pooling
  are Keras's (oneDNN kernels). A non-finite input still gives non-finite
  outputs (tested), so the NaN guard of `byola-keras pretrain` sees it.
"""

import keras
from keras import ops

_BACKEND = keras.backend.backend()


def as_keras_layer(package):
    """Register `cls` under its Keras parent's class name (see above)."""

    def register(cls):
        cls.__name__ = cls.__qualname__ = cls.__mro__[1].__name__
        return keras.saving.register_keras_serializable(package=package)(cls)

    return register


@as_keras_layer("byola_keras.jax")
class MaxPool2x2(keras.layers.MaxPooling2D):
    """`MaxPooling2D` that computes 2x2 / stride 2 / "valid" / channels-last
    pooling as a reshape and a max (odd sizes floor, as before).

    The outputs are identical. On JAX the gradient goes to each window's
    first maximum, as in PyTorch's and TensorFlow's max-pooling, and the
    backward pass keeps one byte per output for it (`jax_pool`); on the
    other backends (a file saved on JAX and loaded there) exactly tied
    maxima share it instead.
    """

    def call(self, inputs):
        if (
            tuple(self.pool_size) != (2, 2)
            or tuple(self.strides) != (2, 2)
            or self.padding != "valid"
            or self.data_format != "channels_last"
        ):
            return super().call(inputs)
        height, width = ops.shape(inputs)[1] // 2, ops.shape(inputs)[2] // 2
        x = inputs[:, : 2 * height, : 2 * width, :]
        if _BACKEND == "jax":
            from byola_keras.backend import jax_pool

            return jax_pool.max_pool_2x2(x)
        x = ops.reshape(x, (-1, height, 2, width, 2, inputs.shape[-1]))
        return ops.max(x, axis=(2, 4))


@as_keras_layer("byola_keras.jax")
class JaxConv2D(keras.layers.Conv2D):
    """`Conv2D` whose kernel gradient is computed the way measured fastest
    on this machine (`byola_keras.backend.jax_conv`)."""

    def convolution_op(self, inputs, kernel):
        if _BACKEND == "jax" and self.data_format == "channels_last":
            from byola_keras.backend import jax_conv

            if jax_conv.supported(
                inputs.shape, kernel.shape, self.strides, self.dilation_rate, self.padding,
                self.groups,
            ):
                kernel = ops.convert_to_tensor(kernel)
                return jax_conv.conv2d(ops.cast(inputs, kernel.dtype), kernel)
        return super().convolution_op(inputs, kernel)


@as_keras_layer("byola_keras.jax")
class JaxBatchNormalization(keras.layers.BatchNormalization):
    """`BatchNormalization` over the last axis of a 2-D or 4-D input whose
    training-mode gradient keeps only its input for the backward pass
    (`byola_keras.backend.jax_batch_norm`) instead of the centred and the
    normalized values.

    Normalizes with the batch's mean and biased variance in training, with the
    moving statistics otherwise (Keras's `call`), and updates the moving
    statistics as the Keras layer does. Computed in float32.
    """

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or not _fused_batch_norm_applies(
            self, inputs, mask, "jax"
        ):
            return super().call(inputs, training=training, mask=mask)
        from byola_keras.backend import jax_batch_norm

        outputs, mean, variance = jax_batch_norm.batch_norm_train(
            ops.cast(inputs, "float32"),
            ops.cast(self.gamma, "float32"),
            ops.cast(self.beta, "float32"),
            self.epsilon,
        )
        mean = ops.stop_gradient(mean)
        variance = ops.stop_gradient(variance)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
        )
        return ops.cast(outputs, self.compute_dtype)


def _nchw(x):
    """Channels-first view of a channels-last torch tensor: torch's
    `channels_last` memory format (no copy when `x` is contiguous)."""
    import torch

    return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def _nhwc(x):
    return x.permute(0, 2, 3, 1)


@as_keras_layer("byola_keras.torch")
class TorchConv2D(keras.layers.Conv2D):
    """`Conv2D` running `torch.nn.functional.conv2d` on a channels-first view."""

    def call(self, inputs):
        if not (
            _BACKEND == "torch"
            and self.data_format == "channels_last"
            and len(inputs.shape) == 4
            and self.groups == 1
            and tuple(self.dilation_rate) == (1, 1)
            and tuple(self.strides) == (1, 1)
            and self.padding == "same"
            and all(k % 2 == 1 for k in self.kernel_size)
        ):
            return super().call(inputs)
        import torch
        import torch.nn.functional as F

        kernel = ops.convert_to_tensor(self.kernel).permute(3, 2, 0, 1)  # HWIO -> OIHW
        kernel = kernel.contiguous(memory_format=torch.channels_last)
        bias = ops.convert_to_tensor(self.bias) if self.use_bias else None
        padding = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)
        outputs = _nhwc(F.conv2d(_nchw(inputs), kernel, bias, padding=padding))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


def _fused_batch_norm_applies(layer, inputs, mask, backend):
    """Whether `layer` (a `BatchNormalization`) can run `backend`'s fused
    kernel on `inputs`: that backend, no mask, the last axis of a 2-D or 4-D
    input, no renormalization or synchronization, with center and scale."""
    return not (
        _BACKEND != backend
        or mask is not None
        or len(inputs.shape) not in (2, 4)
        or layer.axis not in (-1, len(inputs.shape) - 1)
        or layer.renorm
        or layer.synchronized
        or not (layer.center and layer.scale)
    )


@as_keras_layer("byola_keras.torch")
class TorchBatchNormalization(keras.layers.BatchNormalization):
    """`BatchNormalization` over the last axis of a 2-D or 4-D input with
    `torch.nn.functional.batch_norm` (one fused kernel forward and backward).

    Normalizes with the batch's mean and biased variance in training, with the
    moving statistics otherwise, and updates the moving statistics as the Keras
    layer does (`m <- momentum m + (1 - momentum) batch`, biased variance).
    Computed in float32.
    """

    def call(self, inputs, training=None, mask=None):
        if not _fused_batch_norm_applies(self, inputs, mask, "torch"):
            return super().call(inputs, training=training, mask=mask)
        import torch
        import torch.nn.functional as F

        image = len(inputs.shape) == 4
        x = ops.cast(inputs, "float32")
        x = _nchw(x) if image else x
        gamma = ops.cast(self.gamma, "float32")
        beta = ops.cast(self.beta, "float32")
        if training and self.trainable:
            # The kernel also writes the batch mean and the unbiased batch
            # variance into these (momentum 1 replaces their contents).
            batch_mean = torch.zeros_like(gamma)
            batch_var = torch.zeros_like(gamma)
            outputs = F.batch_norm(
                x, batch_mean, batch_var, gamma, beta, training=True, momentum=1.0, eps=self.epsilon
            )
            count = x.numel() // x.shape[1]
            variance = batch_var * ((count - 1) / count)  # biased, as Keras's layer uses
            self.moving_mean.assign(
                self.moving_mean * self.momentum + batch_mean * (1.0 - self.momentum)
            )
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
            )
        else:
            mean = ops.cast(self.moving_mean, "float32")
            variance = ops.cast(self.moving_variance, "float32")
            outputs = F.batch_norm(x, mean, variance, gamma, beta, training=False, eps=self.epsilon)
        return ops.cast(_nhwc(outputs) if image else outputs, self.compute_dtype)


@as_keras_layer("byola_keras.torch")
class TorchMaxPooling2D(keras.layers.MaxPooling2D):
    """`MaxPooling2D` running `torch.nn.functional.max_pool2d` on a
    channels-first view (no transposed copy)."""

    def call(self, inputs):
        if (
            _BACKEND != "torch"
            or self.data_format != "channels_last"
            or len(inputs.shape) != 4
            or self.padding != "valid"
        ):
            return super().call(inputs)
        import torch.nn.functional as F

        return _nhwc(F.max_pool2d(_nchw(inputs), self.pool_size, self.strides))


@as_keras_layer("byola_keras.tensorflow")
class TFBatchNormalization(keras.layers.BatchNormalization):
    """`BatchNormalization` over the last axis of a 2-D or 4-D input with TensorFlow's
    fused batch-norm kernel (`FusedBatchNormV3`: one kernel forward, one
    backward, instead of Keras's separate moments, normalization and their
    gradients).

    Normalizes with the batch's mean and biased variance in training, with the
    moving statistics otherwise, and updates the moving statistics as the Keras
    layer does (`m <- momentum m + (1 - momentum) batch`, biased variance).
    Computed in float32.
    """

    def call(self, inputs, training=None, mask=None):
        if not _fused_batch_norm_applies(self, inputs, mask, "tensorflow"):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = tf.cast(inputs, tf.float32)
        if len(inputs.shape) == 2:  # the kernel takes NHWC: [N, C] as [N, 1, 1, C]
            x = x[:, None, None, :]
        gamma = tf.cast(self.gamma, tf.float32)
        beta = tf.cast(self.beta, tf.float32)
        common = dict(x=x, scale=gamma, offset=beta, epsilon=self.epsilon, data_format="NHWC")
        if training and self.trainable:
            empty = tf.constant([], tf.float32)
            outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                mean=empty, variance=empty, exponential_avg_factor=1.0, is_training=True, **common
            )
            # Under oneDNN, TensorFlow fuses this kernel with a following ReLU,
            # and the fused ReLU turns NaN into 0; adding `0 * mean` (NaN for
            # a channel with a non-finite input) keeps the two apart and a
            # non-finite input visible downstream, as Keras's layer does.
            outputs = outputs + 0.0 * mean
            # The kernel returns the unbiased batch variance; Keras's layer
            # averages the biased one.
            count = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
            variance = variance * ((count - 1.0) / tf.maximum(count, 1.0))
            self.moving_mean.assign(
                self.moving_mean * self.momentum + tf.stop_gradient(mean) * (1.0 - self.momentum)
            )
            self.moving_variance.assign(
                self.moving_variance * self.momentum
                + tf.stop_gradient(variance) * (1.0 - self.momentum)
            )
        else:
            outputs = tf.raw_ops.FusedBatchNormV3(
                mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32),
                is_training=False,
                **common,
            )[0]
        if len(inputs.shape) == 2:
            outputs = outputs[:, 0, 0, :]
        return tf.cast(outputs, self.compute_dtype)


def batch_normalization():
    """The `BatchNormalization` class for this backend (2-D and 4-D inputs)."""
    return conv_block_layers()[1]


def conv_block_layers():
    """`(Conv2D, BatchNormalization, MaxPooling2D)` classes for this backend."""
    if _BACKEND == "torch":
        return TorchConv2D, TorchBatchNormalization, TorchMaxPooling2D
    if _BACKEND == "jax":
        return JaxConv2D, JaxBatchNormalization, MaxPool2x2
    return keras.layers.Conv2D, TFBatchNormalization, keras.layers.MaxPooling2D
