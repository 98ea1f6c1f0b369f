"""Linear evaluation: what a frozen representation is worth on labelled tasks.

The papers' protocol (SPEC.md, "Linear evaluation protocol"): embed every clip
of a task with the frozen encoder, standardize the embeddings with train-split
statistics, train one linear softmax layer (Adam, lr 1e-3, batch
`min(200, n)`, up to 200 epochs, early stopping on validation accuracy with
patience 10 in v1 / 20 in v2, best weights restored) and report the test
accuracy averaged over several seeded runs. A logistic regression with its
regularisation chosen on the validation split is offered beside it.

>>> results = evaluate(encoder, ["manifest_words.csv"], runs=3)  # a WaveformEncoder
>>> print(format_table(results))

From the shell: `byola-keras evaluate ENCODER TASK_MANIFEST... [--runs 5]`.
"""

from byola_keras.evaluation.cli import load_encoder, run_cli
from byola_keras.evaluation.embedding import (
    TaskEmbeddings,
    default_cache_dir,
    embed_log_mels,
    embed_task,
    encoder_fingerprint,
    log_mel_mean_std_encoder,
    log_mel_stats,
    task_log_mels,
)
from byola_keras.evaluation.probes import DEFAULT_C_GRID, linear_probe, logreg_probe, standardize
from byola_keras.evaluation.runner import evaluate, format_table
from byola_keras.evaluation.tasks import Task, load_task, split_valid, task_split_indices

__all__ = [
    "DEFAULT_C_GRID",
    "Task",
    "TaskEmbeddings",
    "default_cache_dir",
    "embed_log_mels",
    "embed_task",
    "encoder_fingerprint",
    "evaluate",
    "format_table",
    "linear_probe",
    "load_encoder",
    "load_task",
    "log_mel_mean_std_encoder",
    "log_mel_stats",
    "logreg_probe",
    "run_cli",
    "split_valid",
    "standardize",
    "task_log_mels",
    "task_split_indices",
]
