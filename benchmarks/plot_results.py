#!/usr/bin/env python
"""The figures of docs/results.md, drawn from the JSON the runs wrote.

    python benchmarks/plot_results.py --history docs/figures/data/cpu_study_history.json \\
        --probe docs/figures/data/cpu_study_probe.json --out docs/figures --name cpu_study

Reads
  - a pretraining run's `OUT/history.json` (`byola-keras pretrain` writes it:
    loss, embedding spread, learning rate and speed per epoch), and
  - the `--json` of `benchmarks/linear_eval.py` (test accuracy of the linear
    probe per task, mean and spread over its runs), whose encoders are labelled
    `e<EPOCHS>` (the run's encoder after that many epochs) or `random ...`
    (the untrained encoder, budget 0),
and writes NAME_learning_curve.png (loss and embedding spread per epoch, the
probed budgets marked) and NAME_probe.png (probe accuracy per task and their
average against the budget, in epochs and samples). Nothing is typed in: every
number comes from the two files. Needs matplotlib (the `notebooks` extra).
"""

import argparse
import json
import os
import re
import sys

_EPOCHS_LABEL = re.compile(r"^e(\d+)$")


def load_history(path):
    """`(epochs, entries, samples per epoch)` of a `history.json`."""
    with open(path, encoding="utf-8") as f:
        history = json.load(f)
    if history.get("format") != "byola-keras-history":
        raise SystemExit(f"{path}: not a byola-keras history.json")
    entries = sorted(history["epochs"], key=lambda e: e["epoch"])
    return history, entries, int(history["steps_per_epoch"]) * int(history["batch_size"])


def probe_budgets(path):
    """`(tasks, [(epochs, label, {task: (mean %, std %)}, (avg mean %, avg std %))])`, by budget."""
    with open(path, encoding="utf-8") as f:
        probe = json.load(f)
    tasks = list(probe["tasks"])
    points = []
    for label, result in probe["results"].items():
        match = _EPOCHS_LABEL.match(label)
        if match:
            epochs = int(match.group(1))
        elif label.startswith("random"):
            epochs = 0
        else:
            continue
        per_task = {
            t: (100 * result["tasks"][t]["linear"]["mean"], 100 * result["tasks"][t]["linear"]["std"])
            for t in tasks
        }
        average = 100 * result["average"]["linear"]
        spread = (sum(s**2 for _, s in per_task.values()) ** 0.5) / len(tasks)  # std of the mean of tasks
        points.append((epochs, label, per_task, (average, spread)))
    if not points:
        raise SystemExit(f"{path}: no encoder labelled e<EPOCHS> or random ...")
    return tasks, sorted(points)


def plot_learning_curve(entries, budgets, samples_per_epoch, title, out):
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in entries]
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.0), dpi=100)
    for ax, key, label in (
        (axes[0], "loss", "BYOL loss"),
        (axes[1], "embedding_spread", "embedding spread (collapse: 0)"),
    ):
        ax.plot(epochs, [e[key] for e in entries], marker="o", markersize=3, color="C0")
        for b in budgets:
            ax.axvline(b, color="0.8", linewidth=0.8, zorder=0)
        ax.set_xlabel(f"epoch ({samples_per_epoch:,} samples each)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(0, max(1.05, max(e["embedding_spread"] for e in entries) * 1.05))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_probe(tasks, points, samples_per_epoch, title, out):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 3.4), dpi=100)
    epochs = [p[0] for p in points]
    for i, task in enumerate(tasks):
        ax.errorbar(
            epochs, [p[2][task][0] for p in points], yerr=[p[2][task][1] for p in points],
            marker="o", markersize=3, capsize=2, color=f"C{i + 1}", label=task,
        )
    ax.errorbar(
        epochs, [p[3][0] for p in points], yerr=[p[3][1] for p in points],
        marker="s", markersize=4, capsize=2, color="k", linewidth=2, label="average",
    )
    ax.set_xticks(epochs)
    ax.set_xticklabels([f"{e}\n({e * samples_per_epoch / 1000:.0f}k)" if e else "0\n(random)" for e in epochs])
    ax.set_xlabel("pretraining epochs (samples seen)")
    ax.set_ylabel("test accuracy (%), linear probe")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", required=True, help="a run's history.json")
    parser.add_argument("--probe", required=True, help="benchmarks/linear_eval.py --json output")
    parser.add_argument("--out", required=True, help="folder of the PNG files")
    parser.add_argument("--name", default="results", help="file name prefix")
    parser.add_argument("--title", default="", help="a line above each figure")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    history, entries, samples_per_epoch = load_history(args.history)
    tasks, points = probe_budgets(args.probe)
    os.makedirs(args.out, exist_ok=True)
    settings = history.get("settings") or {}
    title = args.title or (
        f"BYOL-A {settings.get('version', '')} d={settings.get('dim', '')}, batch {history['batch_size']}"
    )
    curve = os.path.join(args.out, f"{args.name}_learning_curve.png")
    plot_learning_curve(entries, [p[0] for p in points if p[0]], samples_per_epoch, title, curve)
    probe = os.path.join(args.out, f"{args.name}_probe.png")
    plot_probe(tasks, points, samples_per_epoch, title, probe)
    for path in (curve, probe):
        print(f"Wrote {path} ({os.path.getsize(path) / 1000:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
