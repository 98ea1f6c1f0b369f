"""Run an exported BYOL-A SavedModel with TensorFlow alone, as TF Serving would.

    python tests/_tf_only_serving_check.py SAVED_MODEL_DIR INPUTS.npz OUTPUTS.npz

INPUTS.npz holds waveform batches (`[batch, samples]` float32, any keys);
OUTPUTS.npz gets `<key>/embedding` and `<key>/frame_embeddings` for each, plus
the signature's `input_names` and `output_names`.

TensorFlow 2.16+ imports Keras 3 by itself when it is installed, so "keras is
not in sys.modules" cannot hold here; instead `keras`, `tf_keras` and
`byola_keras` are made unimportable before TensorFlow is imported, and the
script checks at the end that none of them was loaded. Exits non-zero (with the
reason on stderr) otherwise.
"""

import sys

BLOCKED = ("keras", "tf_keras", "byola_keras")
for _name in BLOCKED:
    sys.modules[_name] = None  # `import keras` now raises ImportError

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main(saved_model_dir, inputs_path, outputs_path):
    loaded = tf.saved_model.load(saved_model_dir)
    signature = loaded.signatures["serving_default"]
    results = {
        "input_names": np.array(sorted(signature.structured_input_signature[1])),
        "output_names": np.array(sorted(signature.structured_outputs)),
    }
    with np.load(inputs_path) as data:
        for key in data.files:
            outputs = signature(waveform=tf.constant(data[key], dtype=tf.float32))
            for name, value in outputs.items():
                results[f"{key}/{name}"] = value.numpy()
    loaded_blocked = sorted(
        m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None
    )
    if loaded_blocked:
        sys.exit(f"SavedModel needed Python modules it should not: {loaded_blocked}")
    np.savez(outputs_path, **results)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
