"""The `byola-keras` command line.

    byola-keras pretrain [AUDIO_DIR] --epochs N --batch-size B --out DIR [--backend jax]
    byola-keras convert WEIGHTS.pth --out encoder.keras --stats MEAN STD [--htk]
    byola-keras evaluate ENCODER TASK_MANIFEST... [--runs 5]
    byola-keras export ENCODER --out DIR/1 [--format tf_saved_model|onnx|litert]
    byola-keras tune --pool DIR --task MANIFEST --out DIR [--tuner random]

Parsing and checking the arguments imports no backend (the options live in
`byola_keras._cli_options`): `--help` and every bad argument answer at once,
with one line and exit code 2. The module that does a subcommand's work is
imported only when it runs, after `--backend` has set `KERAS_BACKEND`. Adding
a subcommand is one `COMMANDS` entry: its work module (with `run_cli(args)`),
its help line, its options function and an optional check of the parsed
arguments.
"""

import collections
import json
import os
import sys

from byola_keras import _cli_options as options

Command = collections.namedtuple("Command", "module help add_options check", defaults=(None,))

COMMANDS = {
    "pretrain": Command(
        "byola_keras.pretrain", "Pretrain BYOL-A on a folder of audio (or the built-in corpus).",
        options.pretrain_options, options.pretrain_check,
    ),
    "convert": Command(
        "byola_keras.weights", "Convert an official BYOL-A .pth file to a WaveformEncoder .keras file.",
        options.convert_options,
    ),
    "evaluate": Command(
        "byola_keras.evaluation", "Linear evaluation of an encoder on labelled tasks.",
        options.evaluate_options,
    ),
    "export": Command(
        "byola_keras.export", "Export a WaveformEncoder (SavedModel for TF Serving, ONNX, LiteRT).",
        options.export_options,
    ),
    "tune": Command(
        "byola_keras.tuning.cli", "Search the augmentation settings with KerasTuner.",
        options.tune_options,
    ),
    "embed": Command(
        "byola_keras.corpus.run", "Embed every audio file of a folder or manifest into Parquet tables.",
        options.embed_options, options.embed_check,
    ),
}
# Subcommands that train on this machine's CPU keep freed memory for reuse,
# or on JAX run once more with malloc on transparent huge pages where the
# machine allows it (see byola_keras.allocator); the others keep glibc's defaults.
REUSE_FREED_MEMORY_ON_CPU = ("pretrain",)
# Commands that compile the same programs run after run (JAX's persistent
# cache), and after whose compilations malloc's free memory is given back.
COMPILATION_CACHE = ("pretrain", "embed", "evaluate", "tune")


def build_parser():
    """The `byola-keras` parser with every subcommand (imports no backend)."""
    parser = options.ArgumentParser(
        prog="byola-keras", description="BYOL for Audio (BYOL-A) in Keras 3."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        parser_ = sub.add_parser(name, help=command.help, description=command.help)
        options.shared_options(parser_)
        command.add_options(parser_)
        parser_.set_defaults(_check=command.check, _parser=parser_)
    return parser


def _select_backend(backend):
    """Set `--backend` for Keras; returns the backend Keras will run (read as
    Keras reads it: `KERAS_BACKEND`, else `keras.json`), without importing it."""
    if backend:
        if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != backend:
            import keras

            if keras.backend.backend() != backend:
                raise SystemExit(
                    f"--backend {backend}: Keras was already imported with "
                    f"backend {keras.backend.backend()!r} in this process."
                )
        os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return _configured_backend()


def _configured_backend():
    name = os.environ.get("KERAS_BACKEND", "").strip()
    if name:
        return name
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return str(json.load(f).get("backend") or "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def _on_cpu_only():
    """No accelerator visible to this process (checked without starting a backend)."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return True
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return True
    return not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/kfd") or os.path.exists("/dev/accel0"))


def main(argv=None):
    as_program = argv is None  # run as `byola-keras ...`, not called from Python
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args._check is not None:
        args._check(args, args._parser)
    backend = _select_backend(args.backend)
    if args.command in REUSE_FREED_MEMORY_ON_CPU and _on_cpu_only():
        from byola_keras import allocator

        # Before the backend starts its threads; BYOLA_REUSE_FREED_MEMORY=0 opts out.
        if as_program:
            allocator.restart_with_huge_pages(backend)  # JAX: once, with malloc on huge pages
        allocator.reuse_freed_memory_unless_disabled(backend)
    if args.command in COMPILATION_CACHE:
        from byola_keras.backend import compile_cache, trim_after_compile

        compile_cache.enable_for_jax(backend)  # before JAX is imported
        trim_after_compile.install(backend)
    import importlib

    module = importlib.import_module(COMMANDS[args.command].module)
    return module.run_cli(args) or 0


if __name__ == "__main__":
    sys.exit(main())
