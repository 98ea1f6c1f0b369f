"""KerasTuner searches of BYOL-A's augmentation settings (see README.md).

    python -m tuning.search --pool DIR --task MANIFEST --out DIR [--tuner random]

`tuning.hypermodel.BYOLAHyperModel` is the `keras_tuner.HyperModel`;
`tuning.search` the command line (resumable, distributed with KerasTuner's
chief/worker environment variables). Names are imported lazily, so that
`python -m tuning.search --backend ...` can choose the backend before Keras is
imported. The `byola_keras` package itself never imports KerasTuner.
"""

_EXPORTS = ("BYOLAHyperModel", "OBJECTIVE", "OBJECTIVE_NAME", "SearchData")


def __getattr__(name):
    if name in _EXPORTS:
        from tuning import hypermodel

        return getattr(hypermodel, name)
    raise AttributeError(f"module 'tuning' has no attribute {name!r}")


__all__ = list(_EXPORTS)
