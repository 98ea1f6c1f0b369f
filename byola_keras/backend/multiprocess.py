"""The backends' multi-process engines: start one, gather small integers over
its processes, feed it each process's rows of the global batch, and tell the
errors of a lost process.

- JAX: `keras.distribution.initialize` (JAX's coordination service; on a CPU
  the collectives go through gloo) and one `keras.distribution.DataParallel`
  over the devices of every process, listed process by process, with
  `auto_shard_dataset=False`: each process passes its own rows of the global
  batch and Keras assembles the global array
  (`jax.make_array_from_process_local_data`), so row `i` of the global batch
  is row `i` of a one-process run.
- TensorFlow: `tf.distribute.MultiWorkerMirroredStrategy` from `TF_CONFIG`
  (written from the addresses when they come from flags or Keras's
  variables). Each worker's rows reach its replicas through
  `distribute_datasets_from_function`: no auto-sharding, which on a dataset
  of generated batches would shard by batch (every worker skipping the
  others' batches) instead of by row.

PyTorch: Keras has no distribution for it (`start` refuses).
"""

import json
import os

import keras
import numpy as np

BACKENDS = ("jax", "tensorflow")
SHARED_CHOICE_TIMEOUT_S = 900
# What a collective with a dead or unreachable peer fails with (gloo, NCCL, the
# coordination service); not RESOURCE_EXHAUSTED or INVALID_ARGUMENT.
_XLA_PEER_STATUSES = ("UNKNOWN", "UNAVAILABLE", "INTERNAL", "ABORTED", "DEADLINE_EXCEEDED", "CANCELLED")


def start(backend, addresses, num_processes, process_id):
    """Starts the engine of `backend` and returns it.

    Args:
        backend: "jax" or "tensorflow".
        addresses: list of "HOST:PORT" (process 0's first; JAX needs only
            that one, TensorFlow every worker's), or None: JAX detects the
            cluster itself (SLURM, Open MPI, Cloud TPU), TensorFlow reads
            `TF_CONFIG`.
        num_processes, process_id: ints, or None with `addresses=None`.
    """
    if backend == "jax":
        return _JaxEngine(addresses, num_processes, process_id)
    if backend == "tensorflow":
        return _TensorFlowEngine(addresses, num_processes, process_id)
    raise ValueError(
        f"Multi-process training needs the jax or tensorflow backend: Keras has no "
        f"multi-process distribution for {backend!r}."
    )


class _JaxEngine:
    def __init__(self, addresses, num_processes, process_id):
        import jax

        # Only the CPU client's collectives (the accelerators have their own).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # byola_keras.preemption handles SIGTERM itself (and agrees on the step).
        jax.config.update("jax_enable_preemption_service", False)
        coordinator = None if addresses is None else addresses[0]
        keras.distribution.initialize(coordinator, num_processes, process_id)
        self.process_id = jax.process_index()
        self.num_processes = jax.process_count()
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        self.replicas = len(devices)
        self.local_replicas = jax.local_device_count()
        self.distribution = keras.distribution.DataParallel(
            devices=[f"{d.platform}:{d.id}" for d in devices], auto_shard_dataset=False
        )

    def scope(self):
        return self.distribution.scope()

    @staticmethod
    def is_peer_error(error):
        """A failed collective: the runtime's error, or the ValueError with an
        XLA status that JAX raises when a collective fails while dispatching."""
        import jax

        status = str(error).split(":", 1)[0]
        return isinstance(error, (jax.errors.JaxRuntimeError, ValueError)) and status in _XLA_PEER_STATUSES

    def all_gather(self, values):
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather(np.asarray(values, np.int32))
        return np.asarray(gathered).reshape(self.num_processes, -1)

    # No `feed`: `fit` takes each process's `SegmentDataset` shard as it is.

class _TensorFlowEngine:
    def __init__(self, addresses, num_processes, process_id):
        import tensorflow as tf

        if addresses is not None:
            os.environ["TF_CONFIG"] = json.dumps(
                {"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": int(process_id)}}
            )
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy()
        resolver = self.strategy.cluster_resolver
        cluster = resolver.cluster_spec().as_dict()
        chiefs = len(cluster.get("chief", []))
        if resolver.task_type not in ("chief", "worker"):
            raise ValueError(
                f"TF_CONFIG: task type {resolver.task_type!r} is not supported; "
                "use 'worker' (and at most one 'chief')."
            )
        self.num_processes = chiefs + len(cluster.get("worker", []))
        self.process_id = 0 if resolver.task_type == "chief" else chiefs + int(resolver.task_id)
        self.replicas = int(self.strategy.num_replicas_in_sync)
        self.local_replicas = self.replicas // self.num_processes
        self._peer_errors = (
            tf.errors.UnavailableError,
            tf.errors.AbortedError,
            tf.errors.CancelledError,
            tf.errors.DeadlineExceededError,
        )
        self._gather = None

    def is_peer_error(self, error):
        """A failed collective (the coordination service's missed heartbeats, gRPC)."""
        return isinstance(error, self._peer_errors)

    def scope(self):
        return self.strategy.scope()

    def all_gather(self, values):
        import tensorflow as tf

        if self._gather is None:

            @tf.function
            def gather(values):  # every local replica passes this process's values
                # tf.identity: a tensor placed on the replica's device (the input has none).
                return self.strategy.run(
                    lambda v: tf.distribute.get_replica_context().all_gather(tf.identity(v), axis=0),
                    args=(values,),
                )

            self._gather = gather
        result = self._gather(tf.constant(np.asarray(values, np.int64).reshape(1, -1)))
        rows = self.strategy.experimental_local_results(result)[0].numpy()
        return rows[:: self.local_replicas]  # replicas are numbered worker by worker

    def feed(self, batches, local_shape):
        """A distributed dataset of this worker's batches: `batches()` yields
        the worker's rows of each global batch in order; each is split among
        the worker's replicas (consecutive elements go to consecutive local
        replicas)."""
        import tensorflow as tf

        local = self.local_replicas
        per_replica = local_shape[0] // local
        spec = tf.TensorSpec((per_replica, *local_shape[1:]), tf.float32)

        def generate():
            for batch in batches():
                for j in range(local):
                    yield batch[j * per_replica : (j + 1) * per_replica]

        return self.strategy.distribute_datasets_from_function(
            lambda context: tf.data.Dataset.from_generator(generate, output_signature=spec)
        )


def shared_choice(name, decide):
    """`decide()` of process 0 of a JAX job, for every process of it: process
    0 publishes its result in the coordination service's key-value store, the
    others wait for it there (no collective, so it works while a step is being
    traced). In one process, `decide()`. Used for choices made by measuring
    (`autotune.fastest`): processes that timed on their own could choose
    different formulations and run different programs."""
    import jax
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None or jax.process_count() == 1:
        return decide()
    key = f"byola_keras/choice/{name}"
    if jax.process_index() == 0:
        value = str(decide())
        client.key_value_set(key, value)
        return value
    return client.blocking_key_value_get(key, SHARED_CHOICE_TIMEOUT_S * 1000)
