"""Seeding Python, NumPy, Keras and the backend in one call.

`keras.utils.set_random_seed` also seeds TensorFlow whenever it is
installed, and so imports it on every backend (seconds of the README's
first command on JAX where TensorFlow is installed too; docs/performance.md). `set_random_seed` here does the same on the
TensorFlow backend and, on the others, everything but that import: nothing
of TensorFlow runs there, and byola-keras's data pipeline is a
`keras.utils.PyDataset` seeded on its own.
"""

import random

import keras
import numpy as np


def set_random_seed(seed):
    """Seed Python's `random`, NumPy, Keras's global seed generator and the
    backend (TensorFlow only on its own backend), like
    `keras.utils.set_random_seed`."""
    seed = int(seed)
    if keras.backend.backend() == "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    try:
        from keras.src.backend.common import global_state
        from keras.src.random import seed_generator
        from keras.src.utils import rng_utils
    except ImportError:  # a Keras without these internals: its own function
        keras.utils.set_random_seed(seed)
        return
    # What `keras.utils.set_random_seed` stores: the seed (read by
    # `keras.distribution.initialize` on JAX) and no global seed generator
    # (recreated from Python's `random`, seeded below).
    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)
    if keras.backend.backend() == "torch":
        import torch

        torch.manual_seed(seed)
