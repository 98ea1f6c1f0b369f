"""Regenerate the notebooks (`NN_name.ipynb`) from their sources (`NN_name.py`).

The `.py` files, in jupytext's "percent" format, are the reviewable sources;
the `.ipynb` files are generated from them, without outputs, with stable cell
ids (so regenerating an unchanged source gives the same bytes), for Colab.

    python notebooks/_build.py           # rewrite every .ipynb
    python notebooks/_build.py --check   # exit 1 if an .ipynb is out of date

Needs `jupytext` (the `notebooks` extra).
"""

import argparse
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def sources(folder=HERE):
    """The notebook sources: `NN_*.py` files of `folder`, sorted."""
    return sorted(
        path
        for path in glob.glob(os.path.join(folder, "[0-9][0-9]_*.py"))
        if os.path.isfile(path)
    )


def to_notebook(source):
    """The notebook (an `nbformat.NotebookNode`) of one jupytext source file."""
    import jupytext

    notebook = jupytext.read(source, fmt="py:percent")
    stem = os.path.splitext(os.path.basename(source))[0]
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"{stem[:2]}-{index:02d}"
        if cell.cell_type == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    notebook.metadata.setdefault("colab", {"provenance": []})
    return notebook


def render(source):
    """The `.ipynb` text of one source."""
    import jupytext

    return jupytext.writes(to_notebook(source), fmt="ipynb")


def target(source):
    return os.path.splitext(source)[0] + ".ipynb"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Only check that the .ipynb files are up to date.")
    args = parser.parse_args(argv)
    stale = []
    for source in sources():
        text = render(source)
        path = target(source)
        current = None
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                current = f.read()
        if current == text:
            continue
        if args.check:
            stale.append(os.path.basename(path))
            continue
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {os.path.relpath(path)}")
    if stale:
        print(f"out of date (run python notebooks/_build.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
