"""What `byola-keras embed` reads: the files of a folder or of a CSV manifest.

Imports nothing but the standard library, so the command line checks a
manifest before a backend starts. Each file is an `Item`: `key`, the text of
the output's `path` column (relative to the folder, with `/`, for a folder;
as written in the manifest for a manifest, so that it joins with it), the
absolute `path` to decode, and the manifest's other columns (strings).

`--shard I/N` keeps the files whose key hashes to `I` modulo `N` (SHA-1 of
the key): every file belongs to exactly one shard whatever the host, the
listing order or files added later, so shards run on several hosts (or again
after a change) split the corpus the same way.
"""

import collections
import csv
import hashlib
import os

Item = collections.namedtuple("Item", "key path columns")

# Columns the output tables use; a manifest may not have its own of these names.
RESERVED_COLUMNS = ("path", "duration_s", "file_size", "file_mtime_ns", "embedding", "frame", "time_s")


class InputError(ValueError):
    """A manifest or shard specification that cannot be used (the message names it)."""


def read_manifest(path):
    """`(column names, items)` of a CSV manifest with a `path` column.

    The evaluation manifests (`path,label,split[,...]`) are such files; any
    other columns are kept as strings, in the manifest's order. (Not
    `data.read_manifest`: that one requires `label` and `split`, and keeps
    only the resolved path, not the text the output's `path` column holds.) Relative paths
    are resolved against the manifest's folder. Rows that repeat a path are
    refused (each file is one output row).

    Raises:
        InputError: not readable as UTF-8 CSV, no `path` column, a reserved or
            repeated column name, a row with the wrong number of fields, an
            empty or repeated path, or no row at all.
    """
    path = os.path.abspath(os.fspath(path))
    base = os.path.dirname(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if "path" not in header:
                raise InputError(
                    f"manifest '{path}' has no 'path' column (its header: {','.join(header)!r})"
                )
            clashes = [h for h in header if h in RESERVED_COLUMNS and h != "path"]
            if clashes:
                raise InputError(
                    f"manifest '{path}' has column(s) {', '.join(clashes)}, which the output uses; "
                    "rename them"
                )
            repeated = sorted({h for h in header if header.count(h) > 1})
            if repeated or "" in header:
                raise InputError(f"manifest '{path}' has repeated or empty column names")
            columns = [h for h in header if h != "path"]
            items, seen = [], {}
            for line, values in enumerate(reader, start=2):
                if not values or all(not v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    raise InputError(
                        f"manifest '{path}', line {line}: {len(values)} fields, the header has {len(header)}"
                    )
                row = dict(zip(header, (v.strip() for v in values)))
                key = row.pop("path")
                if not key:
                    raise InputError(f"manifest '{path}', line {line}: empty path")
                if key in seen:
                    raise InputError(
                        f"manifest '{path}', line {line}: path {key!r} repeats line {seen[key]}"
                    )
                seen[key] = line
                absolute = os.path.normpath(os.path.join(base, os.path.expanduser(key)))
                items.append(Item(key, absolute, row))
    except UnicodeDecodeError as err:
        raise InputError(f"manifest '{path}' is not UTF-8 text ({err})") from None
    except csv.Error as err:
        raise InputError(f"manifest '{path}' is not a valid CSV file ({err})") from None
    except OSError as err:
        raise InputError(f"cannot read manifest '{path}': {err.strerror or err}") from None
    if not items:
        raise InputError(f"manifest '{path}' lists no file")
    return columns, items


def folder_items(root, files):
    """Items of absolute `files` found under the folder `root` (keys relative to it)."""
    root = os.path.abspath(os.fspath(root))
    return [Item(os.path.relpath(f, root).replace(os.sep, "/"), f, {}) for f in files]


def parse_shard(text):
    """`(index, count)` of a shard specification `I/N`, 0 <= I < N."""
    index, sep, count = str(text).partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        index = count = None
    if not sep or count is None or count < 1 or not 0 <= index < count:
        raise InputError(f"expected I/N with 0 <= I < N (e.g. 0/4); got {text!r}")
    return index, count


def shard_of(key, count):
    """The shard (0 .. count-1) a file key belongs to."""
    digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


def in_shard(items, index, count):
    """The items of shard `index` of `count`, in their order."""
    if count == 1:
        return list(items)
    return [item for item in items if shard_of(item.key, count) == index]

