"""`byola-keras tune`: KerasTuner search of BYOL-A's augmentation settings.

    byola-keras tune --pool DIR --task MANIFEST --out DIR \\
        [--tuner random|bayesian|hyperband] [--max-trials N] [--budget-steps S] \\
        [--backend jax] [--batch-size B] [--dim D]

Every trial pretrains BYOL-A for `--budget-steps` optimizer steps on the
unlabelled `--pool` with one draw of the augmentation settings and is scored by
the linear-probe accuracy on the validation split of the labelled `--task`
(`probe_accuracy`, maximized). The best settings go to `OUT/best.json`, which
`byola-keras pretrain --config OUT/best.json` reads. Running the same command
again resumes the search; KerasTuner's chief/worker environment variables
(`KERASTUNER_TUNER_ID`, `KERASTUNER_ORACLE_IP`, `KERASTUNER_ORACLE_PORT`)
distribute it (see `byola_keras.tuning.search`).

This module imports neither Keras nor KerasTuner, so `--help` is fast and the
backend can still be chosen.
"""

import argparse

from byola_keras.defaults import COMMON_DEFAULTS

TUNERS = ("random", "bayesian", "hyperband")


def _duration(text):
    if text is None or text == "mean":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--duration must be seconds or 'mean'; got {text!r}.") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--duration must be positive; got {text!r}.")
    return value


def _int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dims must be comma-separated integers; got {text!r}.") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--dims must list positive integers; got {text!r}.")
    return values


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}.") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}.")
    return value


def add_cli_arguments(parser):
    """Adds the `tune` options to `parser` (all but `--backend`)."""
    add = parser.add_argument
    add("--pool", required=True, help="Unlabelled audio: a folder (recursive) or a CSV manifest.")
    add("--task", required=True, help="Labelled task manifest (path,label,split CSV); train/valid are used.")
    add("--out", required=True, help="Search folder (caches, KerasTuner state, best.json); re-run to resume.")
    add("--tuner", choices=TUNERS, default="random")
    add("--max-trials", type=_positive, default=20, help="Trials in all (Hyperband: a cap).")
    add("--budget-steps", type=_positive, default=300, help="Pretraining steps per trial.")
    add("--batch-size", type=_positive, default=64, help="Segments per pretraining step.")
    add("--version", choices=("v1", "v2"), default="v1")
    add("--dim", type=_positive, help="Embedding width (default: the version's).")
    add("--dims", type=_int_list, help="Tune the width among these, e.g. 512,1024,2048.")
    add("--tune-fader", action="store_true", help="Also tune the random linear fader gain.")
    add("--lr", type=float, help="Adam learning rate (default: the version's).")
    add("--tau", type=float, default=COMMON_DEFAULTS["tau"])
    add("--memory-size", type=_positive, default=COMMON_DEFAULTS["memory_size"], help="Mixup memory bank size.")
    add("--projection-hidden", type=_positive, default=COMMON_DEFAULTS["projection_hidden"])
    add("--projection-dim", type=_positive, default=COMMON_DEFAULTS["projection_dim"])
    add("--probe-runs", type=_positive, default=3, help="Seeded linear-probe runs per trial (averaged).")
    add("--probe-epochs", type=_positive, default=200)
    add("--probe-patience", type=_positive, help="Probe early-stopping patience (default: the version's).")
    add("--duration", type=_duration, help="Task clips: seconds (crop/pad) or 'mean'; default whole clips.")
    add("--seed", type=int, default=0, help="Seed of the trials' training and of the tuner.")
    add("--hyperband-max-epochs", type=_positive, default=3, help="Hyperband: budget_steps in this many units.")
    add("--hyperband-factor", type=_positive, default=3)
    add("--hyperband-iterations", type=_positive, default=1)
    add("--embed-batch-size", type=_positive, default=64, help="Task clips per encoder call.")
    add("--workers", type=int, help="Pool decoding threads.")
    add("--max-seconds", type=float, help="Decode at most this long a window of each pool clip.")
    add("--jit-compile", choices=("auto", "true", "false"), default="auto")
    add("--run-eagerly", action="store_true", help="No compiled steps (tiny budgets, debugging).")
    add("--verbose", type=int, choices=(0, 1, 2), default=1, help="KerasTuner / fit verbosity.")
    return parser


def run_cli(args):
    """Runs (or resumes) the search of parsed `args`; returns the exit status."""
    try:
        import keras_tuner  # noqa: F401
    except ImportError:
        raise SystemExit("error: byola-keras tune needs KerasTuner: pip install 'byola-keras[tuner]'.") from None
    from byola_keras.tuning import search

    search.run(args)
    return 0
