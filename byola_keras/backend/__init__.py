"""Backend-specific pieces, each chosen by `keras.backend.backend()`.

- `train_step`: the learner's train step with the EMA target update (JAX:
  inside a `StatelessScope`; TensorFlow: in the compiled step; PyTorch: under
  `torch.no_grad()`).
- `conv`: the encoders' conv-block layers with a faster `call` on JAX
  (max-pool, conv kernel gradient), PyTorch (channels-last native kernels) and
  TensorFlow (fused batch norm).
- `dropout`, `jax_dropout`: the encoders' dropout layer; on JAX the same
  mask as Keras's, its Threefry bits computed in one fused pass (JAX's CPU
  lowering loops over the mask's memory five times).
- `bank`: the mixup memory bank's in-place ring write (PyTorch: `index_copy_`;
  JAX/TensorFlow: slice updates XLA performs in place).
- `spectrum`: the front-end's STFT power spectrum (TensorFlow: the `|rfft|`
  form tf2onnx converts to ONNX; elsewhere `keras.ops.stft`).
- `jax_conv`, `autotune`: the JAX convolution's kernel gradient, in the
  formulation measured fastest on this machine (remembered per CPU).
- `onednn`: asks TensorFlow for its oneDNN CPU kernels on every x86-64 CPU.
- `stateless`: a layer's `stateless_call` compiled once on JAX, for calls
  outside `fit()` (the TensorBoard augmentation image).
- `compile_cache`: JAX's persistent compilation cache for the command line.
- `replicas`: the `tf.distribute` replica helpers the learner and the mixup
  layer call (identity on one device and on the other backends).

Everything else in byola_keras is `keras.ops`. Nothing is imported here, so
importing a submodule costs only that submodule.
"""
