"""Run a KerasTuner search of BYOL-A's augmentation settings from a checkout.

    python tuning/search.py --pool DIR --task MANIFEST --out DIR [--backend jax] [...]

The same as `byola-keras tune ...` (see README.md here and
`byola_keras/tuning/`); kept so that the searches in README.md run from the
repository without the console script on the PATH.
"""

import sys

from byola_keras import cli

if __name__ == "__main__":
    sys.exit(cli.main(["tune", *sys.argv[1:]]))
