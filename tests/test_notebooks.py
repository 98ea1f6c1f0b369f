"""The Colab notebooks: generated from their sources, and run top to bottom.

Each notebook is converted from its jupytext source (`notebooks/NN_*.py`) and
executed with nbclient in a fresh `python3` kernel of this interpreter, in an
empty temporary working directory, with `BYOLA_NOTEBOOK_SMALL=1` (tiny data,
a few steps). To keep CI's time budget, every notebook runs under one backend
only: this process runs the notebooks that `BACKEND_OF` assigns to its
`KERAS_BACKEND` (the other backends' processes run the others).
"""

import datetime
import importlib.util
import json
import os
import pathlib
import re
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
COLAB_URL = "https://colab.research.google.com/github/byola-keras/byola-keras/blob/main/notebooks/{}.ipynb"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
MAX_IPYNB_BYTES = 64 * 1024
CELL_TIMEOUT_S = 900

# Which backend executes which notebook (04 exports from a non-TensorFlow
# backend on purpose: the SavedModel is written by a TensorFlow subprocess).
BACKEND_OF = {
    "01_pretrain": "jax",
    "02_linear_evaluation": "torch",
    "03_tuning": "tensorflow",
    "04_export_and_serve": "torch",
}
NEEDS_SHARED = ("02_linear_evaluation",)
BACKEND = os.environ.get("KERAS_BACKEND", "jax")
# What a small run of each notebook must draw, print and write (in its working folder).
EXPECT = {
    "01_pretrain": {
        "images": 3,  # the log-mel, the two views, the loss curve
        "printed": [r"trained 3 epochs", r"embeddings: \(8, 256\)"],
        "files": ["runs/byola/encoder.keras"],
    },
    "02_linear_evaluation": {
        "images": 1,
        "printed": [r"official encoder: AudioNTT2020\(d=512\)", r"== official d512\ntask", r"== own\ntask"],
        "files": ["runs/byola/encoder.keras", "byola_data/tiny_task/manifest_tiny.csv"],
    },
    "03_tuning": {
        "images": 1,
        "printed": [r"Search space summary", r'"alpha": ', r"'freq_scale': \["],
        "files": ["runs/search/best.json"],
    },
    "04_export_and_serve": {
        "images": 0,
        "printed": [r"signature 'serving_default'", r"embedding: \(2, 256\)  frame_embeddings: \(2, 12, 256\)",
                    r"max \|SavedModel - Keras\|: "],
        "files": ["serving/byola/1/saved_model.pb", "request.json"],
    },
}
ASSIGNED = sorted(name for name, backend in BACKEND_OF.items() if backend == BACKEND)


def _load_build():
    spec = importlib.util.spec_from_file_location("_notebook_build", NOTEBOOKS / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()


def _code_cells(notebook):
    return [c for c in notebook.cells if c.cell_type == "code"]


# -- cheap checks of the sources and the generated notebooks -----------------------------


def test_every_notebook_has_a_backend():
    names = [pathlib.Path(p).stem for p in build.sources()]
    assert names, f"no notebook sources in {NOTEBOOKS}"
    assert sorted(names) == sorted(BACKEND_OF), (names, BACKEND_OF)
    assert ASSIGNED, f"no notebook runs under KERAS_BACKEND={BACKEND!r}"


@pytest.mark.parametrize("name", sorted(BACKEND_OF))
def test_generated_notebook_is_current_and_small(name):
    source = NOTEBOOKS / f"{name}.py"
    ipynb = NOTEBOOKS / f"{name}.ipynb"
    assert ipynb.is_file(), f"{ipynb} is missing: run python notebooks/_build.py"
    assert ipynb.read_text(encoding="utf-8") == build.render(str(source)), (
        f"{ipynb.name} is out of date with {source.name}: run python notebooks/_build.py"
    )
    assert ipynb.stat().st_size < MAX_IPYNB_BYTES
    notebook = json.loads(ipynb.read_text(encoding="utf-8"))
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, name
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", sorted(BACKEND_OF))
def test_notebook_opens_in_colab_and_installs_itself(name):
    notebook = build.to_notebook(str(NOTEBOOKS / f"{name}.py"))
    first = notebook.cells[0]
    assert first.cell_type == "markdown"
    assert f"]({COLAB_URL.format(name)})" in first.source and BADGE in first.source
    setup = _code_cells(notebook)[0].source
    # The install is skipped when the package is importable (CI), and the
    # backend is chosen before Keras is imported.
    install = re.search(r'^( +)%pip install -q "byola-keras(\[[a-z,]+\])? @ git\+https://github.com/byola-keras/byola-keras"$',
                        setup, re.M)
    assert install, setup
    assert 'if importlib.util.find_spec("byola_keras") is None' in setup
    assert 'os.environ["KERAS_BACKEND"] = os.environ.get("KERAS_BACKEND", "jax")' in setup
    assert "BYOLA_NOTEBOOK_SMALL" in setup
    assert "import keras" not in setup


# -- executing the notebooks of this backend -----------------------------------------------


def _kernel_manager(tmp_path, env):
    """A kernel manager for a `python3` kernel of this interpreter with `env`."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernel_dir = tmp_path / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (byola-keras tests)",
        "language": "python",
        "env": env,
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def _seconds(cell):
    timing = cell.metadata.get("execution", {})
    try:
        start = datetime.datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))
        end = datetime.datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    return (end - start).total_seconds()


def _kernel_env(tmp_path, shared=None):
    # The repository root goes on the path, so the kernel imports this checkout's
    # byola_keras; the working directory itself is an empty folder.
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {
        "KERAS_BACKEND": BACKEND,
        "BYOLA_NOTEBOOK_SMALL": "1",
        "BYOLA_KERAS_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join(path),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    if shared is not None:
        env["BYOLA_SHARED"] = str(shared)
    return env


def _text(notebook):
    """Everything the notebook printed (streams and plain-text results)."""
    parts = []
    for cell in _code_cells(notebook):
        for output in cell.outputs:
            if output.output_type == "stream":
                parts.append(output.text)
            elif "text/plain" in output.get("data", {}):
                parts.append(output.data["text/plain"])
    return "\n".join(parts)


@pytest.mark.large
@pytest.mark.parametrize("name", ASSIGNED)
def test_notebook_runs(name, tmp_path, request):
    import nbclient

    # Notebook 2 evaluates the official weights: CI reads them from ../shared.
    shared = request.getfixturevalue("shared") if name in NEEDS_SHARED else None

    notebook = build.to_notebook(str(NOTEBOOKS / f"{name}.py"))
    workdir = tmp_path / "work"
    workdir.mkdir()
    client = nbclient.NotebookClient(
        notebook,
        km=_kernel_manager(tmp_path, _kernel_env(tmp_path, shared)),
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    started = time.monotonic()
    try:
        client.execute()
    finally:
        import nbformat

        nbformat.write(notebook, str(tmp_path / f"{name}.executed.ipynb"))
    seconds = time.monotonic() - started
    cells = [(i, _seconds(c)) for i, c in enumerate(notebook.cells) if c.cell_type == "code"]
    slowest = sorted((s, i) for i, s in cells if s is not None)[-3:][::-1]
    print(f"\n{name} [{BACKEND}]: {seconds:.1f} s; slowest cells: "
          + ", ".join(f"#{i} {s:.1f} s" for s, i in slowest))

    # Every code cell ran; none printed an error.
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        assert cell.execution_count is not None, f"{name}: cell {index} did not run"
        assert not [o for o in cell.outputs if o.output_type == "error"], (name, index)
    # What each notebook shows and leaves behind.
    expected = EXPECT[name]
    images = [o for c in _code_cells(notebook) for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= expected["images"], f"{name}: {len(images)} figure(s) drawn"
    printed = _text(notebook)
    for pattern in expected["printed"]:
        assert re.search(pattern, printed), f"{name}: nothing printed matches {pattern!r}"
    for relative in expected["files"]:
        assert (workdir / relative).is_file(), f"{name}: {relative} was not written"
    if name == "03_tuning":
        from byola_keras.pretrain import resolve_settings

        best = json.loads((workdir / "runs/search/best.json").read_text(encoding="utf-8"))
        settings = resolve_settings(best["settings"])  # what `pretrain --config` does
        assert 0.0 <= settings["alpha"] <= 1.0
        assert settings["freq_scale"][0] <= 1.0 <= settings["freq_scale"][1]
