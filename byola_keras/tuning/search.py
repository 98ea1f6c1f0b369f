"""Search BYOL-A's augmentation settings with KerasTuner.

    python -m tuning.search --pool DIR --task MANIFEST --out DIR \\
        [--tuner random|bayesian|hyperband] [--max-trials N] [--budget-steps S] \\
        [--backend jax] [--batch-size B] [--dim D]

Every trial pretrains BYOL-A for `--budget-steps` optimizer steps on the
unlabelled `--pool` with one draw of the augmentation settings and is scored by
the linear-probe accuracy on the validation split of the labelled `--task`
(`probe_accuracy`, maximized; see `tuning.hypermodel`). At the end the best
settings are printed and written to `OUT/best.json`, whose `"settings"` entry
`byola-keras pretrain --config OUT/best.json` reads.

The search is resumable: KerasTuner keeps its state in `OUT/trials`
(`overwrite=False`), so running the same command again continues the same
search (finished trials are not retrained; a trial that was running when the
process stopped is run again); a larger `--max-trials` extends it.

Distributed search, the KerasTuner way: one chief process holds the oracle and
serves it over gRPC, and any number of workers ask it for trials. All share
`--out` and the other arguments; only the environment differs:

    KERASTUNER_TUNER_ID=chief   KERASTUNER_ORACLE_IP=127.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
        CUDA_VISIBLE_DEVICES= python -m tuning.search ARGS &
    KERASTUNER_TUNER_ID=tuner0  KERASTUNER_ORACLE_IP=127.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
        CUDA_VISIBLE_DEVICES=0 python -m tuning.search ARGS &
    KERASTUNER_TUNER_ID=tuner1  ... CUDA_VISIBLE_DEVICES=1 ...

The chief writes `OUT/best.json` once every worker has finished. Every process
appends what it ran to `OUT/log/<tuner id>.jsonl`.
"""

import argparse
import functools
import json
import math
import os
import sys
import time

BACKENDS = ("tensorflow", "jax", "torch")
TUNERS = ("random", "bayesian", "hyperband")
PROJECT = "trials"
BEST_FILE = "best.json"
BASELINE_FILE = "baseline.json"
CONFIG_FILE = "search_config.json"
LOG_DIR = "log"
# Arguments that define a search: resuming with different values is refused.
_FIXED = (
    "pool",
    "task",
    "tuner",
    "version",
    "dim",
    "dims",
    "tune_fader",
    "budget_steps",
    "batch_size",
    "lr",
    "tau",
    "memory_size",
    "projection_hidden",
    "projection_dim",
    "probe_runs",
    "probe_epochs",
    "probe_patience",
    "duration",
    "seed",
    "hyperband_max_epochs",
    "hyperband_factor",
)


def _select_backend(argv):
    """Sets KERAS_BACKEND from `--backend` before Keras is imported."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backend", choices=BACKENDS)
    known, _ = pre.parse_known_args(argv)
    if known.backend:
        if "keras" in sys.modules:
            import keras

            if keras.backend.backend() != known.backend:
                raise SystemExit(
                    f"--backend {known.backend}: Keras was already imported with backend "
                    f"{keras.backend.backend()!r} in this process."
                )
        os.environ["KERAS_BACKEND"] = known.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}.")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m tuning.search",
        description="KerasTuner search of BYOL-A's augmentation settings, scored by a linear probe.",
    )
    parser.add_argument("--pool", required=True, help="Unlabelled audio: a folder (recursive) or a CSV manifest.")
    parser.add_argument("--task", required=True, help="Labelled task manifest (path,label,split CSV); train/valid are used.")
    parser.add_argument("--out", required=True, help="Search folder (caches, KerasTuner state, best.json); re-run to resume.")
    parser.add_argument("--tuner", choices=TUNERS, default="random")
    parser.add_argument("--max-trials", type=_positive, default=20, help="Trials in all (Hyperband: a cap).")
    parser.add_argument("--budget-steps", type=_positive, default=300, help="Pretraining steps per trial.")
    parser.add_argument("--backend", choices=BACKENDS, help="Keras backend (default: KERAS_BACKEND).")
    parser.add_argument("--batch-size", type=_positive, default=64, help="Segments per pretraining step.")
    parser.add_argument("--version", choices=("v1", "v2"), default="v1")
    parser.add_argument("--dim", type=_positive, help="Embedding width (default 2048 v1, 3072 v2).")
    parser.add_argument("--dims", type=_int_list, help="Tune the width among these, e.g. 512,1024,2048.")
    parser.add_argument("--tune-fader", action="store_true", help="Also tune the random linear fader gain.")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default 3e-4 v1, 1e-4 v2).")
    parser.add_argument("--tau", type=float, default=0.99)
    parser.add_argument("--memory-size", type=_positive, default=2048, help="Mixup memory bank size.")
    parser.add_argument("--projection-hidden", type=_positive, default=4096)
    parser.add_argument("--projection-dim", type=_positive, default=256)
    parser.add_argument("--probe-runs", type=_positive, default=3, help="Seeded linear-probe runs per trial (averaged).")
    parser.add_argument("--probe-epochs", type=_positive, default=200)
    parser.add_argument("--probe-patience", type=_positive, help="Probe early-stopping patience (10 v1, 20 v2).")
    parser.add_argument("--duration", type=_duration, help="Task clips: seconds (crop/pad) or 'mean'; default whole clips.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the trials' training and of the tuner.")
    parser.add_argument("--hyperband-max-epochs", type=_positive, default=3, help="Hyperband: budget_steps in this many units.")
    parser.add_argument("--hyperband-factor", type=_positive, default=3)
    parser.add_argument("--hyperband-iterations", type=_positive, default=1)
    parser.add_argument("--embed-batch-size", type=_positive, default=64, help="Task clips per encoder call.")
    parser.add_argument("--workers", type=int, help="Pool decoding threads.")
    parser.add_argument("--max-seconds", type=float, help="Decode at most this long a window of each pool clip.")
    parser.add_argument("--jit-compile", choices=("auto", "true", "false"), default="auto")
    parser.add_argument("--run-eagerly", action="store_true", help="No compiled steps (tiny budgets, debugging).")
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1, help="KerasTuner / fit verbosity.")
    return parser


def _role():
    """"single", "chief" or "worker", from KerasTuner's environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    for name in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        if name not in os.environ:
            raise SystemExit(f"error: KERASTUNER_ORACLE_IP is set but {name} is not.")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


@functools.lru_cache(maxsize=None)
def _tuner_classes():
    import keras_tuner

    class TrialLog:
        """Appends one JSON line per finished trial to `OUT/log/<tuner id>.jsonl`."""

        log_path = None

        def run_trial(self, trial, *args, **kwargs):
            self._trial_results = None
            results = super().run_trial(trial, *args, **kwargs)
            self._trial_results = results
            return results

        def on_trial_begin(self, trial):
            self._trial_started = time.time()
            super().on_trial_begin(trial)

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            from tuning.hypermodel import rss_mb

            results = getattr(self, "_trial_results", None) or []
            results = results if isinstance(results, list) else [results]
            metrics = {}
            for key in sorted({k for r in results for k in r}):
                values = [float(r[key]) for r in results if key in r]
                metrics[key] = sum(values) / len(values)
            record = {
                "tuner_id": self.tuner_id,
                "trial_id": trial.trial_id,
                "status": str(trial.status),
                "metrics": metrics,
                "hyperparameters": dict(trial.hyperparameters.values),
                "seconds": time.time() - getattr(self, "_trial_started", time.time()),
                "rss_mb": rss_mb(),
                "pid": os.getpid(),
            }
            if self.log_path:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            score = metrics.get("probe_accuracy")
            shown = "failed" if score is None else f"probe_accuracy {score:.4f}"
            print(
                f"[{self.tuner_id}] trial {trial.trial_id} {str(trial.status).lower()}: {shown} "
                f"({record['seconds']:.1f} s)",
                flush=True,
            )

    class PaperDefaultsFirst:
        """Oracle mixin: a new search's first trial is the paper's settings
        (the search space's defaults), so that every search measures what it
        gains over them. A resumed search has trials already: no repeat."""

        def populate_space(self, trial_id):
            if not self.trials:
                return {"status": "RUNNING", "values": paper_default_values(self.hyperparameters)}
            return super().populate_space(trial_id)

    class RandomSearchOracle(PaperDefaultsFirst, keras_tuner.oracles.RandomSearchOracle):
        pass

    class BayesianOptimizationOracle(PaperDefaultsFirst, keras_tuner.oracles.BayesianOptimizationOracle):
        pass

    def oracle_tuner(oracle_class):
        class PaperFirstTuner(TrialLog, keras_tuner.Tuner):
            def __init__(self, hypermodel, objective, max_trials, seed,
                         max_consecutive_failed_trials=3, **kwargs):
                oracle = oracle_class(
                    objective=objective,
                    max_trials=max_trials,
                    seed=seed,
                    max_consecutive_failed_trials=max_consecutive_failed_trials,
                )
                super().__init__(oracle, hypermodel, **kwargs)

        return PaperFirstTuner

    RandomSearch = oracle_tuner(RandomSearchOracle)
    BayesianOptimization = oracle_tuner(BayesianOptimizationOracle)

    class Hyperband(TrialLog, keras_tuner.Hyperband):
        pass

    return {"random": RandomSearch, "bayesian": BayesianOptimization, "hyperband": Hyperband}


def paper_default_values(hyperparameters):
    """The search space's defaults (the paper's settings) as trial values."""
    return {hp.name: hp.default for hp in hyperparameters.space if hyperparameters.is_active(hp)}


def paper_defaults_trial(oracle):
    """The finished trial that ran the paper's settings, or None."""
    defaults = paper_default_values(oracle.hyperparameters)
    for trial in completed_trials(oracle):
        if dict(trial.hyperparameters.values) == defaults:
            return trial
    return None


def make_tuner(kind, hypermodel, out, max_trials=20, seed=0, executions_per_trial=1,
               hyperband_max_epochs=3, hyperband_factor=3, hyperband_iterations=1):
    """A KerasTuner tuner over `hypermodel` with its project in `OUT/trials` (resumes).

    Trials are seeded alike, so `executions_per_trial` > 1 repeats the same run;
    probe noise is averaged with the hypermodel's `probe_runs` instead.
    """
    from tuning.hypermodel import OBJECTIVE

    cls = _tuner_classes()[kind]
    common = dict(
        objective=OBJECTIVE,
        seed=int(seed) + 1,  # KerasTuner draws a random seed for 0
        executions_per_trial=executions_per_trial,
        directory=out,
        project_name=PROJECT,
        overwrite=False,
        max_consecutive_failed_trials=3,
    )
    if kind == "hyperband":
        tuner = cls(
            hypermodel,
            max_epochs=hyperband_max_epochs,
            factor=hyperband_factor,
            hyperband_iterations=hyperband_iterations,
            **common,
        )
        # HyperbandOracle takes no max_trials, but honours one (a cap on the brackets).
        tuner.oracle.max_trials = max_trials
    else:
        tuner = cls(hypermodel, max_trials=max_trials, **common)
    log_dir = os.path.join(out, LOG_DIR)
    os.makedirs(log_dir, exist_ok=True)
    tuner.log_path = os.path.join(log_dir, f"{tuner.tuner_id}.jsonl")
    return tuner


def completed_trials(oracle):
    """The oracle's finished trials with a `probe_accuracy`, in trial-id order."""
    out = []
    for trial_id in sorted(oracle.trials):
        trial = oracle.trials[trial_id]
        if str(trial.status) == "COMPLETED" and trial.metrics.exists("probe_accuracy"):
            out.append(trial)
    return out


def best_record(tuner, hypermodel, args=None):
    """The JSON written to `OUT/best.json`: pretrain settings, score and trial info."""
    from tuning.hypermodel import OBJECTIVE_NAME

    done = completed_trials(tuner.oracle)
    best = tuner.oracle.get_best_trials(1)
    if not best or not done:
        return None
    trial = best[0]
    metrics = {
        name: float(trial.metrics.get_last_value(name))
        for name in trial.metrics.metrics
        if trial.metrics.get_last_value(name) is not None
    }
    data = hypermodel.data
    record = {
        "settings": hypermodel.settings(trial.hyperparameters),
        OBJECTIVE_NAME: float(trial.score),
        "trial_id": trial.trial_id,
        "hyperparameters": dict(trial.hyperparameters.values),
        "metrics": metrics,
        "trials_completed": len(done),
        "search": {
            "tuner": getattr(args, "tuner", None),
            "pool": data.pool,
            "task": data.task_manifest,
            "budget_steps": hypermodel.budget_steps,
            "batch_size": hypermodel.batch_size,
            "projection_hidden": hypermodel.projection_hidden,
            "projection_dim": hypermodel.projection_dim,
            "probe_runs": hypermodel.probe_runs,
            "pool_mean": data.mean,
            "pool_std": data.std,
            "project_dir": tuner.project_dir,
        },
        "ranking": [
            {"trial_id": t.trial_id, OBJECTIVE_NAME: float(t.score)}
            for t in tuner.oracle.get_best_trials(len(done))
        ],
    }
    paper = paper_defaults_trial(tuner.oracle)
    if paper is not None:
        record["paper_defaults"] = {
            "trial_id": paper.trial_id,
            "hyperparameters": dict(paper.hyperparameters.values),
            OBJECTIVE_NAME: float(paper.score),
        }
        record["gain_over_paper_defaults"] = float(trial.score) - float(paper.score)
    import keras

    record["search"]["backend"] = keras.backend.backend()
    return record


def _check_resume(out, args, write=True):
    """Records the search's defining arguments; refuses to resume with others.

    Workers only compare (`write=False`) with what their chief recorded.
    """
    path = os.path.join(out, CONFIG_FILE)
    current = {k: getattr(args, k) for k in _FIXED}
    current["pool"] = os.path.abspath(current["pool"])
    current["task"] = os.path.abspath(current["task"])
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        differ = {k: (saved.get(k), current[k]) for k in _FIXED if saved.get(k) != current[k]}
        if differ:
            lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differ.items())
            raise ValueError(
                f"'{out}' holds a search with other settings ({lines}); resume it with the "
                "same arguments (only --max-trials may grow) or use another --out."
            )
        return
    if not write:
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(current, f, indent=2)
    os.replace(tmp, path)


def _baseline(out, hypermodel):
    """The untrained learner's probe accuracy, computed once per search folder."""
    path = os.path.join(out, BASELINE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    result = hypermodel.baseline()
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
    return result


def run(args):
    """Runs (or resumes) the search described by parsed `args`; returns a summary dict."""
    from tuning.hypermodel import BYOLAHyperModel, SearchData

    role = _role()
    out = os.path.abspath(args.out)
    try:
        os.makedirs(out, exist_ok=True)
        _check_resume(out, args, write=False)
        data = SearchData(
            args.pool, args.task, out, duration=args.duration, seed=args.seed,
            workers=args.workers, max_seconds=args.max_seconds,
        )
        data.prepare(verbose=args.verbose > 0)
        # Recorded once the data is known good; a worker only compares (its
        # chief held the data lock first and has recorded them by now).
        _check_resume(out, args, write=role != "worker")
    except (OSError, ValueError) as error:  # bad arguments or data: no traceback
        raise SystemExit(f"error: {error}") from None
    if args.tuner == "hyperband":
        steps_per_epoch = math.ceil(args.budget_steps / args.hyperband_max_epochs)
    else:
        steps_per_epoch = args.budget_steps
    jit = {"auto": "auto", "true": True, "false": False}[args.jit_compile]
    hypermodel = BYOLAHyperModel(
        data,
        version=args.version,
        dim=args.dim,
        dims=args.dims,
        tune_fader=args.tune_fader,
        budget_steps=args.budget_steps,
        steps_per_epoch=steps_per_epoch,
        batch_size=args.batch_size,
        lr=args.lr,
        tau=args.tau,
        memory_size=args.memory_size,
        projection_hidden=args.projection_hidden,
        projection_dim=args.projection_dim,
        probe_runs=args.probe_runs,
        probe_epochs=args.probe_epochs,
        probe_patience=args.probe_patience,
        embed_batch_size=args.embed_batch_size,
        seed=args.seed,
        jit_compile=jit,
        run_eagerly=args.run_eagerly,
    )
    tuner = make_tuner(
        args.tuner,
        hypermodel,
        out,
        max_trials=args.max_trials,
        seed=args.seed,
        hyperband_max_epochs=args.hyperband_max_epochs,
        hyperband_factor=args.hyperband_factor,
        hyperband_iterations=args.hyperband_iterations,
    )
    if role != "worker":
        before = len(completed_trials(tuner.oracle))
        if before:
            print(f"Resuming the search in {tuner.project_dir}: {before} trial(s) already done.", flush=True)
    started = time.time()
    tuner.search(verbose=args.verbose)
    summary = {
        "role": role,
        "tuner_id": tuner.tuner_id,
        "out": out,
        "seconds": time.time() - started,
        "fits": len(hypermodel.fit_history),
        "best": None,
        "tuner": tuner,
        "hypermodel": hypermodel,
    }
    if role == "worker":
        # The chief may be gone already: ask it nothing more.
        print(f"[{tuner.tuner_id}] finished: ran {len(hypermodel.fit_history)} trial(s).", flush=True)
        return summary
    record = best_record(tuner, hypermodel, args)
    if record is None:
        print("No trial completed: nothing to report.", flush=True)
        return summary
    record["baseline"] = _baseline(out, hypermodel)
    path = os.path.join(out, BEST_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)
    print(
        f"Best of {record['trials_completed']} trial(s): trial {record['trial_id']}, "
        f"probe_accuracy {record['probe_accuracy']:.4f} (untrained encoder: "
        f"{record['baseline']['probe_accuracy']:.4f} +- {record['baseline']['probe_accuracy_std']:.4f})",
        flush=True,
    )
    if "paper_defaults" in record:
        paper = record["paper_defaults"]
        verdict = (
            "the paper's defaults won"
            if record["trial_id"] == paper["trial_id"]
            else f"gain over the paper's defaults {100 * record['gain_over_paper_defaults']:+.1f} points"
        )
        print(
            f"Paper's defaults (trial {paper['trial_id']}): probe_accuracy {paper['probe_accuracy']:.4f}; {verdict}",
            flush=True,
        )
    print(json.dumps(record["settings"], indent=2), flush=True)
    print(f"Wrote {path}; pretrain with: byola-keras pretrain AUDIO_DIR --config {path}", flush=True)
    summary["best"] = record
    summary["best_path"] = path
    return summary


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    _select_backend(argv)
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
