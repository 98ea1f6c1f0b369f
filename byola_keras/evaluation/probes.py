"""Classifiers on frozen embeddings: the papers' linear probe and a logistic regression.

Both standardize the embeddings with the train split's per-dimension mean and
std only (valid and test are transformed with those same statistics).

The linear probe follows the BYOL-A linear evaluation protocol: one Dense
layer with softmax (initialised like PyTorch's `nn.Linear`), Adam (learning
rate 1e-3), batch `min(200, n)`, up to 200 epochs, early stopping on
validation accuracy (patience 10 in v1, 20 in v2) with the best epoch's
weights restored; test accuracy over several seeded runs.

The logistic regression (scikit-learn's, L2, lbfgs) picks its inverse
regularisation strength `C` on the validation split from a small grid.
"""

import time
import warnings

import keras
import numpy as np

from byola_keras import seeding

DEFAULT_C_GRID = (0.01, 0.1, 1.0, 10.0)


def standardize(train, *others):
    """Standardize arrays `[N, d]` with the first one's per-column mean and std.

    Columns with zero std in `train` are only centred. Returns a tuple of
    float32 arrays: `train` then each of `others`, all transformed with the
    statistics of `train` alone.
    """
    train = np.asarray(train, dtype="float64")
    if train.ndim != 2 or train.shape[0] == 0:
        raise ValueError(f"Expected train embeddings `[N, d]` with N > 0; got shape {train.shape}.")
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    out = []
    for x in (train, *others):
        x = np.asarray(x, dtype="float64")
        if x.ndim != 2 or x.shape[1] != train.shape[1]:
            raise ValueError(f"Expected embeddings `[N, {train.shape[1]}]`; got shape {x.shape}.")
        out.append(((x - mean) / std).astype("float32"))
    return tuple(out)


def _check_split(name, split):
    x, y = split
    x = np.asarray(x)
    y = np.asarray(y).astype("int32").reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"The {name} split must be (embeddings [N, d], labels [N]); got shapes {x.shape} and {y.shape}."
        )
    if x.shape[0] == 0:
        raise ValueError(f"The {name} split is empty.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"The {name} embeddings contain NaN or infinite values.")
    return x, y


class _FewThreads:
    """On torch, one intra-op thread while the probe trains (restored after).

    The probe's matrices are tiny; on a busy machine several torch threads
    spin against each other and make each epoch 10-20 times slower.
    """

    def __enter__(self):
        self.saved = None
        if keras.backend.backend() == "torch":
            import torch

            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import torch

            torch.set_num_threads(self.saved)
        return False


def _reinitialise(model, fresh_optimizer, seed):
    """A fresh probe without recompiling: new weights and a new Adam state.

    Kernel and bias are drawn from U(-1/sqrt(d), 1/sqrt(d)) with NumPy (so
    they are the same on every backend), the initialisation of PyTorch's
    `nn.Linear`, which the papers' evaluation used; with early stopping the
    initial scale matters (Glorot's, about 2.4 times larger at d=512, scored
    a few points lower on the dev tasks). Reusing one compiled model across
    runs saves a compilation per run (JAX, TF).
    """
    dense = model.get_layer("classifier")
    kernel_shape = tuple(dense.kernel.shape)
    bound = 1.0 / np.sqrt(kernel_shape[0])
    rng = np.random.default_rng(seed)
    dense.kernel.assign(rng.uniform(-bound, bound, kernel_shape).astype("float32"))
    dense.bias.assign(rng.uniform(-bound, bound, tuple(dense.bias.shape)).astype("float32"))
    for variable, value in zip(model.optimizer.variables, fresh_optimizer):
        variable.assign(value)


def _summary(accuracies):
    acc = np.asarray(accuracies, dtype="float64")
    return {"mean": float(acc.mean()), "std": float(acc.std()), "accuracies": [float(a) for a in acc]}


def linear_probe(
    train,
    valid,
    test,
    n_classes=None,
    runs=5,
    seed=0,
    patience=10,
    learning_rate=1e-3,
    epochs=200,
    batch_size=200,
    jit_compile="auto",
    return_history=False,
):
    """The papers' linear evaluation: a softmax Dense layer trained with Adam.

    Each run `r` uses the seed `seed + r` (initialisation and shuffling),
    starts from PyTorch `nn.Linear`'s initialisation (uniform in
    +-1/sqrt(d), as in the papers' PyTorch code), trains on standardized
    train embeddings with batch `min(batch_size, n)`,
    stops when validation accuracy has not improved for `patience` epochs
    and restores the weights of the best epoch (the first one, on ties).

    Args:
        train, valid, test: `(embeddings [N, d], int labels [N])` pairs.
        n_classes: number of classes (default: 1 + the largest label).
        runs: number of seeded runs.
        seed: seed of the first run.
        patience: early-stopping patience in epochs (10 in v1, 20 in v2).
        learning_rate: Adam learning rate.
        epochs: maximum number of epochs.
        batch_size: largest batch (the papers' 200).
        jit_compile: passed to `model.compile`.
        return_history: also return each run's validation accuracy per epoch.

    Returns:
        A dict: `mean`, `std` (population) and `accuracies` (test, one per run),
        `valid_accuracies` (of the restored weights), `best_epochs` (1-based),
        `epochs` (trained), `seconds`, and `histories` when asked.
    """
    x_tr, y_tr = _check_split("train", train)
    x_va, y_va = _check_split("valid", valid)
    x_te, y_te = _check_split("test", test)
    if runs < 1:
        raise ValueError(f"`runs` must be at least 1; got {runs}.")
    if n_classes is None:
        n_classes = int(max(y_tr.max(), y_va.max(), y_te.max())) + 1
    x_tr, x_va, x_te = standardize(x_tr, x_va, x_te)
    batch = int(min(batch_size, x_tr.shape[0]))
    start = time.perf_counter()
    runs_log = {"test": [], "valid": [], "best": [], "epochs": [], "history": []}
    model = keras.Sequential(
        [
            keras.Input((x_tr.shape[1],)),
            keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="classifier"),
        ],
        name="linear_probe",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    model.optimizer.build(model.trainable_variables)
    fresh_optimizer = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    with _FewThreads():
        for run in range(runs):
            run_seed = int(seed) + run
            seeding.set_random_seed(run_seed)
            _reinitialise(model, fresh_optimizer, run_seed)
            _fit_one_run(model, patience, epochs, batch, (x_tr, y_tr), (x_va, y_va), (x_te, y_te), runs_log)
    result = _summary(runs_log["test"])
    result.update(
        valid_accuracies=runs_log["valid"],
        best_epochs=runs_log["best"],
        epochs=runs_log["epochs"],
        seconds=time.perf_counter() - start,
    )
    if return_history:
        result["histories"] = runs_log["history"]
    return result


def _fit_one_run(model, patience, epochs, batch, train, valid, test, log):
    x_tr, y_tr = train
    x_va, y_va = valid
    x_te, y_te = test
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_accuracy", mode="max", patience=patience, restore_best_weights=True
    )
    history = model.fit(
        x_tr,
        y_tr,
        batch_size=batch,
        epochs=epochs,
        validation_data=(x_va, y_va),
        callbacks=[stopper],
        shuffle=True,
        verbose=0,
    )
    kernel, bias = model.get_layer("classifier").get_weights()
    log["test"].append(float(np.mean(np.argmax(x_te @ kernel + bias, axis=1) == y_te)))
    log["valid"].append(float(np.mean(np.argmax(x_va @ kernel + bias, axis=1) == y_va)))
    log["best"].append(int(stopper.best_epoch) + 1)
    log["epochs"].append(len(history.history["val_accuracy"]))
    log["history"].append([float(v) for v in history.history["val_accuracy"]])


def _sklearn():
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:
        raise ImportError(
            "The logistic-regression probe (probe='logreg' or 'both') needs scikit-learn: "
            "`pip install scikit-learn`. The linear probe (probe='linear') does not."
        ) from err
    return LogisticRegression, ConvergenceWarning


def logreg_probe(train, valid, test, grid=DEFAULT_C_GRID, max_iter=1000):
    """L2 logistic regression on standardized embeddings, `C` chosen on valid.

    Each `C` in `grid` is fitted on train (lbfgs, multinomial); the one with
    the best validation accuracy (the smallest, on ties) gives the test
    accuracy. Deterministic, so it runs once.

    Returns:
        A dict: `mean`, `std` (0), `accuracies` (one), `valid_accuracy`, `C`,
        `valid_by_C`, `seconds`.
    """
    LogisticRegression, ConvergenceWarning = _sklearn()
    x_tr, y_tr = _check_split("train", train)
    x_va, y_va = _check_split("valid", valid)
    x_te, y_te = _check_split("test", test)
    if not len(grid):
        raise ValueError("`grid` must hold at least one value of C.")
    x_tr, x_va, x_te = standardize(x_tr, x_va, x_te)
    start = time.perf_counter()
    best = None
    scores = {}
    for c in sorted(float(c) for c in grid):
        clf = LogisticRegression(C=c, max_iter=max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x_tr, y_tr)
        acc = float(np.mean(clf.predict(x_va) == y_va))
        scores[repr(c)] = acc
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    valid_acc, c, clf = best
    result = _summary([float(np.mean(clf.predict(x_te) == y_te))])
    result.update(valid_accuracy=valid_acc, C=c, valid_by_C=scores, seconds=time.perf_counter() - start)
    return result
