"""Register byola_keras's Keras classes without making `import byola_keras` import Keras.

`keras.saving.load_model` finds a custom class only once the module defining it
has run `register_keras_serializable`. `register_when_keras_loads()` imports
`byola_keras.layers` and `byola_keras.models` at once when Keras is already
imported, and otherwise installs a one-shot import hook that does so right
after the `keras` package has finished importing (whatever imports it).
"""

import importlib.abc
import importlib.util
import sys


def _register():
    importlib.import_module("byola_keras.layers")
    importlib.import_module("byola_keras.models")


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    """Wraps the loader of the top-level `keras` package; removes itself once Keras ran.

    (A `find_spec("keras")` that only checks whether Keras is installed, as
    TensorFlow's import does, gets a wrapped spec too and leaves the hook in place.)
    """

    _searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras" or path is not None or self._searching:
            return None
        self._searching = True
        try:
            spec = importlib.util.find_spec("keras")
        finally:
            self._searching = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module  # this spec's own loader instance

        def exec_then_register(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def register_when_keras_loads():
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "saving"):
        _register()
    elif keras is None and not any(isinstance(f, _RegisterAfterKeras) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterKeras())
