"""The only backend-specific code of the learner: run the parent's train step,
then move the target network towards the online one (`BYOLA.update_target`).

Chosen once from `keras.backend.backend()`, like Keras's own trainers. The
update itself is plain `keras.ops` (`BYOLA.update_target`); what differs is how
each backend lets a step write variables:
- JAX: `train_step(state, data)` is pure, so the update runs inside a
  `keras.StatelessScope` over the post-optimizer state and returns new
  non-trainable values.
- TensorFlow: variables are assigned inside the (jit-compiled) `tf.function`;
  under `MultiWorkerMirroredStrategy` the logs are returned as one-element
  vectors (Keras's multi-worker reduction of the logs needs an axis).
- PyTorch: variables are assigned under `torch.no_grad()`, and the gradients
  are dropped after the step (Keras clears them only after the next step's
  forward pass, which they would otherwise accompany at its peak).
"""

import keras

_BACKEND = keras.backend.backend()

if _BACKEND == "jax":

    class EMATrainStep:
        def train_step(self, state, data):
            logs, state = super().train_step(state, data)
            trainable, non_trainable, optimizer_vars, metrics_vars = state
            mapping = list(zip(self.trainable_variables, trainable))
            mapping += list(zip(self.non_trainable_variables, non_trainable))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                self.update_target()
            non_trainable = [
                scope.get_current_value(v) for v in self.non_trainable_variables
            ]
            return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)

elif _BACKEND == "torch":
    import torch

    class EMATrainStep:
        def train_step(self, data):
            logs = super().train_step(data)
            with torch.no_grad():
                self.update_target()
            self.zero_grad(set_to_none=True)
            return logs

else:  # tensorflow (and any backend whose variables assign in place)
    from byola_keras.backend import replicas

    class EMATrainStep:
        def train_step(self, data):
            logs = super().train_step(data)
            self.update_target()
            if replicas.in_multi_worker_mode():
                # Keras reduces each log with `strategy.reduce("MEAN", v, axis=0)`
                # under MultiWorkerMirroredStrategy, which fails on scalars
                # (tensorflow/tensorflow#72388): give it one-element vectors,
                # whose mean over the replicas is the scalar again.
                import tensorflow as tf

                logs = {k: tf.reshape(v, [1]) for k, v in logs.items()}
            return logs
