"""byola-keras: BYOL for Audio (BYOL-A) in Keras 3 for TensorFlow, JAX and PyTorch.

    from byola_keras.models import BYOLA, AudioNTT2020
    from byola_keras.layers import LogMelSpectrogram

Submodules are imported on first use, so that `import byola_keras` does not
import Keras (the command line picks the backend before Keras loads) and never
imports TensorFlow or KerasTuner under the JAX or PyTorch backends. The
serializable classes are registered with Keras as soon as Keras is imported
(see `_registration`), so `keras.saving.load_model` finds them either way.
"""

import importlib

from byola_keras import _registration
from byola_keras.backend import onednn

__version__ = "0.1.0"

_SUBMODULES = (
    "allocator",
    "data",
    "embed",
    "evaluation",
    "export",
    "frontend",
    "hear",
    "layers",
    "models",
    "pretrain",
    "tuning",
    "weights",
)

__all__ = [*_SUBMODULES, "__version__"]


_registration.register_when_keras_loads()
onednn.request_onednn()  # TensorFlow's oneDNN kernels on AVX2 CPUs too (see the module)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"byola_keras.{name}")
    raise AttributeError(f"module 'byola_keras' has no attribute {name!r}")
