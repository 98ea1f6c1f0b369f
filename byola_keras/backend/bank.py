"""Writing rows into the mixup memory bank without copying the bank.

The bank (2,048 x 64 x 96 float32, 50 MB for the papers' settings) takes a
batch of rows at ring positions every training step. A plain functional
update (`scatter_update` then `assign`) costs one or two full copies of the
bank per step on every backend, which was most of the augmentation time:

- JAX and TensorFlow (jit-compiled): two contiguous `slice_update`s, one
  ending at the end of the bank and one starting at its start, each keeping
  the rows it must not touch, which XLA performs in place (JAX: the compiled
  step holds no bank-sized copy, tested; TensorFlow: the step's time did not
  grow measurably with the bank's size). A read of the bank earlier in the
  same step (the mixup background) must be passed as `after`: XLA's copy
  insertion does not see that the read comes first unless the write depends
  on it, and then copies the whole bank twice per step.
- PyTorch (eager): `index_copy_` into the variable's tensor, in place. Inside
  a `keras.StatelessScope` (the functional `stateless_call` API) the
  functional path is used instead, so the caller's tensors are not mutated.

This is the one backend-specific piece of the augmentation layers.
"""

import keras
from keras import ops


def ring_write(memory, pointer, rows, after=None):
    """Write `rows` (`[n, ...]`, `n <= memory size`) into the variable `memory`
    at positions `pointer, pointer + 1, ...` modulo its size, ordered after
    `after` (a tensor read from the bank in this step, or `None`)."""
    if keras.backend.backend() == "torch" and not _in_stateless_scope():
        import torch

        bank = memory.value
        start = ops.convert_to_tensor(pointer).to(torch.int64)
        positions = torch.remainder(torch.arange(rows.shape[0], device=bank.device) + start, bank.shape[0])
        with torch.no_grad():
            bank.index_copy_(0, positions, rows.to(bank.dtype))
        return
    if after is not None:
        rows = _after(rows, after)
    memory.assign(_ring_updated(ops.convert_to_tensor(memory), pointer, rows))


def _ring_updated(bank, pointer, rows):
    """`bank` with `rows` written at ring positions from `pointer` (functional)."""
    size = bank.shape[0]
    n = ops.shape(rows)[0]
    start = ops.minimum(pointer, size - n)
    shift = pointer - start  # > 0 only when the write wraps around the end
    index = ops.arange(n, dtype="int32")
    rolled = ops.take(rows, ops.mod(index - shift, n), axis=0)  # rolled[i] = rows[i - shift]
    keep = ops.reshape(index < shift, (-1,) + (1,) * (len(bank.shape) - 1))
    corner = [0] * (len(bank.shape) - 1)
    # Rows [start, start + n): the first `shift` keep their values. A gather,
    # not `ops.slice`: TensorFlow's XLA takes a slice's start as a compile-time
    # constant and recompiled the step for every bank position (measured).
    tail = ops.take(bank, start + index, axis=0)
    bank = ops.slice_update(bank, [start, *corner], ops.where(keep, tail, rolled))
    # Rows [0, n): the first `shift` take the wrapped-around end of `rows`.
    head = bank[:n]
    return ops.slice_update(bank, [0, *corner], ops.where(keep, rolled, head))


def _after(x, y):
    """`x`, made to depend on `y` (exactly `x` while `y` is finite)."""
    x = ops.convert_to_tensor(x)
    zero = ops.minimum(ops.abs(ops.reshape(y, (-1,))[0]), 0.0)
    return ops.add(x, ops.cast(zero, x.dtype))


def _in_stateless_scope():
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return in_stateless_scope()
