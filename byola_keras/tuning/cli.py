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

The options are defined in `byola_keras._cli_options.tune_options` (no
backend import); this module runs the search.
"""

def run_cli(args):
    """Runs (or resumes) the search of parsed `args`; returns the exit status."""
    try:
        import keras_tuner  # noqa: F401
    except ImportError:
        raise SystemExit("error: byola-keras tune needs KerasTuner: pip install 'byola-keras[tuner]'.") from None
    from byola_keras.tuning import search

    search.run(args)
    return 0
