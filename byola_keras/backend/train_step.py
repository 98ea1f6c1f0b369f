"""The only backend-specific code of the learner: its training step, then the
move of the target network towards the online one (`BYOLA.update_target`).

Chosen once from `keras.backend.backend()`, like Keras's own trainers. The
update itself is plain `keras.ops` (`BYOLA.update_target`); what differs is how
each backend lets a step write variables:
- JAX: `train_step(state, data)` is pure, so the update runs inside a
  `keras.StatelessScope` over the post-optimizer state and returns new
  non-trainable values.
- TensorFlow: variables are assigned inside the `tf.function`; under
  `MultiWorkerMirroredStrategy` the logs are returned as one-element vectors
  (Keras's multi-worker reduction of the logs needs an axis).
- PyTorch: variables are assigned under `torch.no_grad()`, and the gradients
  are dropped after the step (Keras clears them only after the next step's
  forward pass, which they would otherwise accompany at its peak).

One view at a time (PyTorch and TensorFlow, where `BYOLA.uses_per_view_backward()`):
the step computes both views and their target projections, then runs view 1
through the online network and the predictor and its backward pass, then view
2 and its backward pass, and applies the sum of the two gradients once. Only
one view's activations are held at a time, where Keras's step (one forward
pass over both views, one backward pass) holds both at its peak. PyTorch runs
the passes in that order as written; in TensorFlow's graph the second view's
forward pass is made to wait for the first view's gradients (a control
dependency), as the graph would otherwise run them side by side. On JAX, XLA
plans the whole step's memory itself, and the step stays Keras's.
"""

import keras

_BACKEND = keras.backend.backend()


def _loss_tracker(model):
    """The metric Keras's trainer reports as `loss`."""
    return next(m for m in model.metrics if m.name == "loss")


def _outputs(views_out, targets):
    """`forward_views`'s dict from the per-view passes' outputs."""
    projections, predictions = zip(*views_out)
    return {
        "prediction": keras.ops.concatenate(predictions, axis=0),
        "target": keras.ops.concatenate(targets, axis=0),
        "projection": keras.ops.concatenate(projections, axis=0),
    }


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
            if self.uses_per_view_backward():
                logs = self._train_step_per_view(data)
            else:
                logs = super().train_step(data)
            with torch.no_grad():
                self.update_target()
            self.zero_grad(set_to_none=True)
            return logs

        def _train_step_per_view(self, data):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            with torch.no_grad():
                views, targets = self.views_and_targets(x)
            self.zero_grad(set_to_none=True)
            total, outputs = 0.0, []
            for view, other_target in zip(views, targets[::-1]):
                loss, projection, prediction = self.online_view_loss(view, other_target)
                # backward() adds this view's gradients to the weights' `.grad`
                self.optimizer.scale_loss(loss).backward()
                total = total + loss.detach()
                outputs.append((projection.detach(), prediction.detach()))
            weights = self.trainable_weights[:]
            with torch.no_grad():
                self.optimizer.apply([v.value.grad for v in weights], weights)
            _loss_tracker(self).update_state(total, sample_weight=views[0].shape[0])
            return self.compute_metrics(x, y, _outputs(outputs, targets), sample_weight=sample_weight)

else:  # tensorflow (and any backend whose variables assign in place)
    from byola_keras.backend import replicas

    class EMATrainStep:
        def train_step(self, data):
            if self.uses_per_view_backward():
                logs = self._train_step_per_view(data)
            else:
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

        def _train_step_per_view(self, data):
            import tensorflow as tf

            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            views, targets = self.views_and_targets(x)
            weights = self.trainable_weights
            gradients, total, outputs = None, 0.0, []
            for view, other_target in zip(views, targets[::-1]):
                if gradients is not None:
                    # This view's forward pass waits for the last view's backward pass.
                    with tf.control_dependencies([g for g in gradients if g is not None]):
                        view = tf.identity(view)
                with tf.GradientTape() as tape:
                    loss, projection, prediction = self.online_view_loss(view, other_target)
                    scaled = self.optimizer.scale_loss(loss)
                view_gradients = tape.gradient(scaled, weights)
                gradients = view_gradients if gradients is None else [
                    b if a is None else a if b is None else a + b
                    for a, b in zip(gradients, view_gradients)
                ]
                total = total + loss
                outputs.append((projection, prediction))
            self.optimizer.apply_gradients(zip(gradients, weights))
            # Keras's trainer tracks the loss before the division by the replicas.
            _loss_tracker(self).update_state(
                total * float(replicas.num_replicas()), sample_weight=tf.shape(views[0])[0]
            )
            return self.compute_metrics(x, y, _outputs(outputs, targets), sample_weight=sample_weight)
