"""Replica helpers for `tf.distribute` (identity on one device and on JAX and PyTorch).

Under `tf.distribute.MirroredStrategy` the learner divides its loss by the
number of replicas and every replica pushes the global batch into its mixup
memory bank; `byola_keras.distribute` explains the data-parallel set-up.
"""

import keras


def _replica_context():
    """The TensorFlow replica context when several replicas run, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def in_multi_worker_mode():
    """True inside a `tf.distribute.MultiWorkerMirroredStrategy` of several workers."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        strategy.extended._in_multi_worker_mode()
    )


def num_replicas():
    """Replicas running this step in sync (1 outside a `tf.distribute` replica context)."""
    context = _replica_context()
    return 1 if context is None else int(context.num_replicas_in_sync)


def scale_loss_for_replicas(loss):
    """`loss / replicas` inside a TensorFlow replica context, else `loss`.

    Keras's TensorFlow trainer sums the replicas' gradients and multiplies the
    tracked loss by the number of replicas; its built-in losses divide by it.
    A model that computes its own loss in `compute_loss` must do the same.
    """
    replicas = num_replicas()
    if replicas == 1:
        return loss
    return loss / float(replicas)


def gather_from_replicas(x):
    """Concatenate `x` over the replicas (in replica order, i.e. global-batch
    order) inside a TensorFlow replica context; identity elsewhere."""
    context = _replica_context()
    if context is None:
        return x
    return context.all_gather(x, axis=0)
