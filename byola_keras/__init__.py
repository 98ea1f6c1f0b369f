"""byola-keras: BYOL for Audio (BYOL-A) in Keras 3 for TensorFlow, JAX and PyTorch.

Importing this package imports Keras and the chosen backend only: TensorFlow and
KerasTuner are imported by the modules that need them (export, tuning), never
here.
"""

__version__ = "0.1.0"

from byola_keras import frontend, layers, models  # noqa: E402

__all__ = ["frontend", "layers", "models", "__version__"]
