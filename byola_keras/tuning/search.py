"""A resumable, optionally distributed KerasTuner search over `BYOLAHyperModel`.

`run(args)` runs the search that `byola-keras tune` describes (the options are
in `byola_keras._cli_options.tune_options`). At the end the best settings are printed and
written to `OUT/best.json`, whose `"settings"` entry
`byola-keras pretrain --config OUT/best.json` reads.

The search is resumable: KerasTuner keeps its state in `OUT/trials`
(`overwrite=False`), so running the same command again continues the same
search (finished trials are not retrained; a trial that was running when the
process stopped is run again); a larger `--max-trials` extends it.

Distributed search, the KerasTuner way: one chief process holds the oracle and
serves it over gRPC, and any number of workers ask it for trials. All share
`--out` and the other arguments; only the environment differs:

    KERASTUNER_TUNER_ID=chief   KERASTUNER_ORACLE_IP=127.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
        CUDA_VISIBLE_DEVICES= byola-keras tune ARGS &
    KERASTUNER_TUNER_ID=tuner0  KERASTUNER_ORACLE_IP=127.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
        CUDA_VISIBLE_DEVICES=0 byola-keras tune ARGS &

The chief writes `OUT/best.json` once every worker has finished. Every process
appends what it ran to `OUT/log/<tuner id>.jsonl`.

TensorBoard (`tensorboard --logdir OUT/tensorboard`): one folder per trial,
`OUT/tensorboard/<trial id>/execution0`, with the trial's hyperparameters
(HParams dashboard), its pretraining's epoch scalars in `train/` and its
objective (`probe_accuracy`, its spread over the probe's runs, the pretraining
loss) at the trial's last pretraining step. On TensorFlow this is KerasTuner's
own TensorBoard support: `keras.callbacks.TensorBoard` passed to `search`,
which KerasTuner gives a folder per trial and an HParams callback. KerasTuner
does that only on the TensorFlow backend (and Keras's callback writes with
`tf.summary`), so on JAX and PyTorch the same layout is written by
`byola_keras.run_logging.TrialTensorBoard`, without TensorFlow. A trial run
again after a stop starts its folder over.
"""

import functools
import json
import math
import os
import shutil
import time

from byola_keras._files import atomic_write_json as write_json
from byola_keras._files import read_json, rss_mb

PROJECT = "trials"
BEST_FILE = "best.json"
BASELINE_FILE = "baseline.json"
CONFIG_FILE = "search_config.json"
LOG_DIR = "log"
TENSORBOARD_DIR = "tensorboard"
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
        tensorboard_dir = None  # OUT/tensorboard, or None: no TensorBoard logs

        def run_trial(self, trial, *args, **kwargs):
            self._trial_results = None
            if self.tensorboard_dir and not _kerastuner_writes_tensorboard():
                from byola_keras import run_logging

                logdir = run_logging.trial_logdir(self.tensorboard_dir, trial.trial_id)
                kwargs["callbacks"] = [
                    *kwargs.get("callbacks", []),
                    run_logging.TrialTensorBoard(logdir, trial.hyperparameters.values, trial.trial_id),
                ]
            results = super().run_trial(trial, *args, **kwargs)
            self._trial_results = results
            return results

        def on_trial_begin(self, trial):
            self._trial_started = time.time()
            if self.tensorboard_dir:  # a trial run again after a stop starts over
                shutil.rmtree(os.path.join(self.tensorboard_dir, str(trial.trial_id)), ignore_errors=True)
            super().on_trial_begin(trial)

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
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
            if self.tensorboard_dir:
                _log_trial_result(self.tensorboard_dir, trial, metrics)
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


def _kerastuner_writes_tensorboard():
    """KerasTuner sets up `keras.callbacks.TensorBoard` per trial (folder and
    HParams) only on the TensorFlow backend."""
    import keras

    return keras.backend.backend() == "tensorflow"


def tensorboard_callbacks(out):
    """The callbacks `search` gets for TensorBoard: Keras's, which KerasTuner
    sets up per trial, on TensorFlow; none elsewhere (see `TrialLog.run_trial`)."""
    if not _kerastuner_writes_tensorboard():
        return []
    import keras

    return [keras.callbacks.TensorBoard(os.path.join(out, TENSORBOARD_DIR), write_graph=False)]


def _log_trial_result(root, trial, metrics):
    """Writes a finished trial's objective into its TensorBoard folder, where
    the HParams dashboard finds it."""
    from byola_keras import run_logging

    scalars = {k: v for k, v in metrics.items() if k in ("probe_accuracy", "probe_accuracy_std", "pretrain_loss")}
    if not scalars:
        return
    events = run_logging.EventFile(run_logging.trial_logdir(root, trial.trial_id))
    events.scalars(int(metrics.get("pretrain_steps", 0)), scalars)
    if not _kerastuner_writes_tensorboard():
        events.summary(run_logging.session_end_summary(success=True))
    events.close()


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
    from byola_keras.tuning.hypermodel import OBJECTIVE

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
    from byola_keras.tuning.hypermodel import OBJECTIVE_NAME

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
        saved = read_json(path)
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
    write_json(path, current)


def _baseline(out, hypermodel):
    """The untrained learner's probe accuracy, computed once per search folder."""
    path = os.path.join(out, BASELINE_FILE)
    if os.path.isfile(path):
        return read_json(path)
    result = hypermodel.baseline()
    write_json(path, result)
    return result


def run(args):
    """Runs (or resumes) the search described by parsed `args`; returns a summary dict."""
    from byola_keras.tuning.hypermodel import BYOLAHyperModel, SearchData

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
    callbacks = []
    if not getattr(args, "no_tensorboard", False):
        tuner.tensorboard_dir = os.path.join(out, TENSORBOARD_DIR)
        callbacks = tensorboard_callbacks(out)
    started = time.time()
    tuner.search(verbose=args.verbose, callbacks=callbacks)
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
    write_json(path, record)
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
