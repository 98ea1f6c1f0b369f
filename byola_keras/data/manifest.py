"""CSV manifests of labelled audio: `path,label,split[,...]`."""

import csv
import os
import warnings

REQUIRED_COLUMNS = ("path", "label", "split")
SPLITS = ("train", "valid", "test")
_SPLIT_ALIASES = {"val": "valid", "validation": "valid"}


def read_manifest(path, missing="error"):
    """Reads a CSV manifest of audio files with labels and splits.

    The first row names the columns; `path`, `label` and `split` are required,
    any others (e.g. `task`, `group`) are kept as strings. Relative paths are
    resolved against the manifest's folder. Splits are `train`, `valid` or
    `test` (`val` and `validation` are read as `valid`).

    Args:
        path: the CSV file.
        missing: what to do with rows whose audio file does not exist:
            "error" (default) raises `FileNotFoundError` naming them, "skip"
            drops them with a `RuntimeWarning` naming them.

    Returns:
        A list of dicts, one per row, in file order, with `path` an absolute
        path (str), `label` and `split` strings, plus the extra columns.

    Raises:
        FileNotFoundError: the manifest, or (with `missing="error"`) a listed file,
            does not exist.
        ValueError: a required column is missing, a row is malformed, a split is
            unknown, or the manifest lists no file.
    """
    if missing not in ("error", "skip"):
        raise ValueError(f'`missing` must be "error" or "skip"; got {missing!r}.')
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Manifest '{path}' "
            + ("is a folder, not a CSV file." if os.path.isdir(path) else "does not exist.")
        )
    base = os.path.dirname(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ValueError(
                    f"Manifest '{path}' is empty (expected a header row: path,label,split)."
                )
            header = [h.strip() for h in header]
            absent = [c for c in REQUIRED_COLUMNS if c not in header]
            if absent:
                raise ValueError(
                    f"Manifest '{path}' lacks column(s) {', '.join(absent)}; its header is "
                    f"{','.join(header)!r}, expected at least path,label,split."
                )
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise ValueError(f"Manifest '{path}' repeats column(s) {', '.join(dupes)}.")
            rows = []
            for line, values in enumerate(reader, start=2):
                if not values or all(not v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    raise ValueError(
                        f"Manifest '{path}', line {line}: {len(values)} fields, "
                        f"the header has {len(header)}."
                    )
                row = dict(zip(header, (v.strip() for v in values)))
                if not row["path"]:
                    raise ValueError(f"Manifest '{path}', line {line}: empty path.")
                split = _SPLIT_ALIASES.get(row["split"].lower(), row["split"].lower())
                if split not in SPLITS:
                    raise ValueError(
                        f"Manifest '{path}', line {line}: unknown split {row['split']!r} "
                        f"(expected one of {', '.join(SPLITS)})."
                    )
                row["split"] = split
                row["path"] = os.path.normpath(os.path.join(base, os.path.expanduser(row["path"])))
                row["_line"] = line
                rows.append(row)
    except UnicodeDecodeError as err:
        raise ValueError(f"Manifest '{path}' is not UTF-8 text ({err}).") from None
    except csv.Error as err:
        raise ValueError(f"Manifest '{path}' is not a valid CSV file ({err}).") from None
    if not rows:
        raise ValueError(f"Manifest '{path}' lists no file.")

    absent = [row for row in rows if not os.path.isfile(row["path"])]
    if absent:
        names = "; ".join(f"line {r['_line']}: '{r['path']}'" for r in absent[:5])
        more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
        if missing == "error":
            raise FileNotFoundError(
                f"Manifest '{path}' lists {len(absent)} file(s) that do not exist: {names}{more}. "
                'Pass missing="skip" to drop them.'
            )
        warnings.warn(
            f"Manifest '{path}': skipped {len(absent)} listed file(s) that do not exist: "
            f"{names}{more}.",
            RuntimeWarning,
            stacklevel=2,
        )
        gone = {id(r) for r in absent}
        rows = [r for r in rows if id(r) not in gone]
        if not rows:
            raise ValueError(f"Manifest '{path}': none of the listed files exists.")
    for row in rows:
        del row["_line"]
    return rows
