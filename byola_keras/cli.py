"""The `byola-keras` command line.

    byola-keras pretrain [AUDIO_DIR] --epochs N --batch-size B --out DIR [--backend jax]
    byola-keras convert WEIGHTS.pth --out encoder.keras
    byola-keras evaluate ENCODER TASK_MANIFEST... [--runs 5]
    byola-keras export ENCODER --out DIR/1
    byola-keras tune --pool DIR --task MANIFEST --out DIR [--tuner random]

`--backend` (anywhere on the line) is read before Keras is imported; otherwise
KERAS_BACKEND or Keras's own default applies. Each subcommand lives in the module
that does the work, which provides `add_cli_arguments(parser)` and `run_cli(args)`.
"""

import argparse
import importlib
import os
import sys

from byola_keras import allocator

COMMANDS = {
    "pretrain": ("byola_keras.pretrain", "Pretrain BYOL-A on a folder of audio (or the built-in corpus)."),
    "convert": ("byola_keras.weights", "Convert an official BYOL-A .pth file to a .keras encoder."),
    "evaluate": ("byola_keras.evaluation", "Linear evaluation of an encoder on labelled tasks."),
    "export": ("byola_keras.export", "Export an encoder as a SavedModel for TF Serving."),
    "tune": ("byola_keras.tuning.cli", "Search the augmentation settings with KerasTuner."),
}
BACKENDS = ("tensorflow", "jax", "torch")


def _select_backend(argv):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backend", choices=BACKENDS)
    known, _ = pre.parse_known_args(argv)
    if known.backend:
        if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != known.backend:
            import keras

            if keras.backend.backend() != known.backend:
                raise SystemExit(
                    f"--backend {known.backend}: Keras was already imported with "
                    f"backend {keras.backend.backend()!r} in this process."
                )
        os.environ["KERAS_BACKEND"] = known.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser(commands=None):
    parser = argparse.ArgumentParser(
        prog="byola-keras", description="BYOL for Audio (BYOL-A) in Keras 3."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if commands is not None and name not in commands:
            continue
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument(
            "--backend", choices=BACKENDS, help="Keras backend (default: KERAS_BACKEND or Keras's)."
        )
        module = importlib.import_module(module_name)
        module.add_cli_arguments(command)
        command.set_defaults(_run=module.run_cli)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    _select_backend(argv)
    # Before the backend starts its threads; BYOLA_REUSE_FREED_MEMORY=0 opts out.
    allocator.reuse_freed_memory_unless_disabled()
    wanted = [a for a in argv if a in COMMANDS][:1] or None
    parser = build_parser(wanted)
    args = parser.parse_args(argv)
    return args._run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
