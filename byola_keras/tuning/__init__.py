"""KerasTuner search of BYOL-A's augmentation settings (`byola-keras tune`).

    byola-keras tune --pool DIR --task MANIFEST --out DIR [--tuner random]

`BYOLAHyperModel` (in `byola_keras.tuning.hypermodel`) is the
`keras_tuner.HyperModel`; `byola_keras.tuning.search` runs a resumable,
optionally distributed search; `byola_keras.tuning.cli` runs it from the command line
options. Names are imported on first use, so that importing this package
imports neither Keras nor KerasTuner (the command line picks the backend
first). Needs the `tuner` extra: `pip install "byola-keras[tuner]"`.
"""

import importlib

_EXPORTS = {
    "BYOLAHyperModel": "hypermodel",
    "OBJECTIVE": "hypermodel",
    "OBJECTIVE_NAME": "hypermodel",
    "SPACE": "hypermodel",
    "SearchData": "hypermodel",
    "make_tuner": "search",
    "best_record": "search",
    "run": "search",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"byola_keras.tuning.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'byola_keras.tuning' has no attribute {name!r}")
