"""Multi-device data parallelism for BYOL-A: small helpers.

JAX: `keras.distribution.DataParallel` runs one SPMD program over the global
batch, so batch statistics (BatchNorm, Post-Normalization), random draws, the
mixup memory bank and the EMA target behave exactly as on one device:

    keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = BYOLA(...); model.compile(...); model.fit(x, batch_size=256)

TensorFlow: `tf.distribute.MirroredStrategy` runs one copy of the step per
replica on its share of the batch. The learner divides its loss by the number
of replicas (as Keras's built-in losses do, so that the summed gradients are
those of the global mean), the target weights are written by the first
replica only (`aggregation="only_first_replica"`), and every replica pushes
the whole global batch into its mixup memory bank (`gather_from_replicas`), so
the banks stay identical and fill as on one device. Batch statistics
(BatchNorm, Post-Normalization) are per replica, as with any Keras model under
MirroredStrategy, and the replicas draw the same augmentation parameters for
the same position in their share of the batch.

    strategy = tf.distribute.MirroredStrategy()
    with strategy.scope():
        model = BYOLA(...); model.compile(...)
    model.fit(x, batch_size=256)

On one CPU, `host_devices(n)` splits it into `n` devices for trying this out
(call it before anything initialises the backend). `data_parallel_scope()`
picks the engine for the backend (what `byola-keras pretrain --data-parallel`
uses):

    scope, replicas = data_parallel_scope()
    with scope:
        model = BYOLA(...); model.compile(...)
        model.fit(x, batch_size=256)  # a multiple of `replicas`
"""

import os

import keras

from byola_keras.backend.replicas import gather_from_replicas, num_replicas, scale_loss_for_replicas


def host_devices(count):
    """Make the CPU appear as `count` devices (JAX: `XLA_FLAGS`; TensorFlow:
    logical devices). Must run before the backend creates its devices."""
    count = int(count)
    if count < 1:
        raise ValueError(f"`count` must be >= 1; got {count}.")
    backend = keras.backend.backend()
    if backend == "jax":
        flag = f"--xla_force_host_platform_device_count={count}"
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag.split("=")[0])]
        os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
        import jax

        if len(jax.devices("cpu")) != count:
            raise RuntimeError(
                "JAX was initialised before host_devices(); set "
                f"XLA_FLAGS={flag} before the first JAX computation."
            )
        return jax.devices("cpu")
    if backend == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
        return tf.config.list_logical_devices("CPU")
    raise ValueError(f"host_devices() supports the jax and tensorflow backends, not {backend}.")


def data_parallel_scope():
    """A scope that builds and trains models data-parallel over every device
    of the backend, and the number of devices.

    JAX: `keras.distribution.DataParallel` over `keras.distribution.list_devices()`
    (the GPUs or TPUs if any, else the CPU devices). TensorFlow:
    `tf.distribute.MirroredStrategy` over the GPUs, or over the logical CPU
    devices when there is no GPU. Build, compile (or load) and `fit()` the
    model inside the scope; the global batch must be a multiple of the count.
    """
    backend = keras.backend.backend()
    if backend not in ("jax", "tensorflow"):
        raise ValueError(
            f"Data-parallel training needs the jax or tensorflow backend; Keras has no "
            f"distribution for {backend!r}."
        )
    if backend == "jax":
        devices = keras.distribution.list_devices()
        return keras.distribution.DataParallel(devices=devices).scope(), len(devices)
    import tensorflow as tf

    if tf.config.list_logical_devices("GPU"):
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    return strategy.scope(), int(strategy.num_replicas_in_sync)


__all__ = [
    "data_parallel_scope",
    "gather_from_replicas",
    "host_devices",
    "num_replicas",
    "scale_loss_for_replicas",
]
