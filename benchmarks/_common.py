"""Small helpers shared by benchmark scripts: backend set-up, machine info, JSON, tables.

Nothing here imports Keras at module level, so a script can parse its arguments
and call `setup_backend()` before Keras picks a backend.

    args = parser.parse_args()
    setup_backend(args.backend)
    ...
    print(format_table(["model", "acc %"], [["a", "71.2"], ["b", "69.0"]]))
    write_json("benchmarks/results/x.json", {"results": ...})
"""

import datetime
import json
import os
import platform
import sys
import time

BACKENDS = ("jax", "tensorflow", "torch")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")


def add_backend_argument(parser):
    """`--backend jax|tensorflow|torch` (default: KERAS_BACKEND, else jax)."""
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=os.environ.get("KERAS_BACKEND") or "jax",
        help="Keras backend (default: KERAS_BACKEND or jax).",
    )
    return parser


def reuse_freed_memory(backend=None):
    """`byola_keras.reuse_freed_memory()` (glibc malloc keeps freed memory), as
    the command line applies it for `backend`; returns whether it was applied."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from byola_keras.allocator import reuse_freed_memory_unless_disabled

    return reuse_freed_memory_unless_disabled(backend)


def setup_backend(backend, as_program=True):
    """Set KERAS_BACKEND before Keras is imported (torch is imported before
    TensorFlow), with the command line's malloc settings: on JAX, where the
    machine allows it, the program runs again with malloc on transparent huge
    pages (`allocator.restart_with_huge_pages`; only `as_program`, i.e. when
    the script was started, not called from Python) and free memory is given
    back after each compilation; elsewhere freed memory is reused."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    if as_program:
        from byola_keras import allocator

        allocator.restart_with_huge_pages(backend)
    reuse_freed_memory(backend)
    from byola_keras.backend import trim_after_compile

    trim_after_compile.install(backend)
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            raise RuntimeError(f"Keras is already imported with backend {keras.backend.backend()!r}.")
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if backend == "torch":
        import torch  # noqa: F401


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


VECTOR_EXTENSIONS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                     "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_vector_extensions():
    """The vector extensions among `/proc/cpuinfo`'s flags that decide which
    kernels the backends run (AVX2, AVX-512, AMX), in a fixed order."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [name for name in VECTOR_EXTENSIONS if name in flags]
    except OSError:
        pass
    return []


def _devices(backend):
    try:
        if backend == "jax":
            import jax

            return [str(d) for d in jax.devices()]
        if backend == "tensorflow":
            import tensorflow as tf

            return [d.name for d in tf.config.list_logical_devices()]
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            return [f"cpu ({torch.get_num_threads()} threads)"]
    except Exception as error:  # noqa: BLE001 - informative only
        return [f"unknown ({error})"]
    return []


def machine_info():
    """CPU, cores, load, platform, library versions and the backend's devices."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    versions = {"python": platform.python_version()}
    for name in ("keras", "numpy", "jax", "jaxlib", "tensorflow", "torch", "sklearn"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    backend = None
    if "keras" in sys.modules:
        backend = sys.modules["keras"].backend.backend()
    info = {
        "cpu": _cpu_model(),
        "cpu_vector_extensions": cpu_vector_extensions(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "versions": versions,
        "backend": backend,
        "devices": _devices(backend) if backend else [],
    }
    if "tensorflow" in sys.modules:
        try:
            from tensorflow.python.util import _pywrap_util_port

            info["tensorflow_onednn"] = bool(_pywrap_util_port.IsMklEnabled())
        except ImportError:
            pass
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # NumPy scalars and arrays
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path, payload, machine=True):
    """Write `payload` (a dict) as indented JSON, adding `machine`, `argv` and `written`.

    Folders are created; NumPy values and paths are converted. Returns the path.
    """
    path = os.fspath(path)
    record = dict(payload)
    if machine:
        record.setdefault("machine", machine_info())
    record.setdefault("argv", sys.argv)
    record.setdefault("written", datetime.datetime.now().isoformat(timespec="seconds"))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(record), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def default_json_path(name, backend=None):
    """`benchmarks/results/NAME[-BACKEND].json`."""
    suffix = f"-{backend}" if backend else ""
    return os.path.join(RESULTS_DIR, f"{name}{suffix}.json")


def format_table(headers, rows, markdown=False, align=None):
    """A text table: the first column left-aligned, the others right-aligned.

    Args:
        headers: column titles.
        rows: lists of cells (converted with `str`); `None` prints as "-".
        markdown: a Markdown pipe table instead of aligned plain text.
        align: optional string of "l"/"r" per column.
    """
    cells = [["-" if c is None else str(c) for c in row] for row in rows]
    headers = [str(h) for h in headers]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"Row {row} has {len(row)} cells; the table has {len(headers)} columns.")
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max([len(headers[i])] + [len(r[i]) for r in cells]) for i in range(len(headers))]

    def fit(text, i):
        return text.ljust(widths[i]) if align[i] == "l" else text.rjust(widths[i])

    if markdown:
        rule = ["-" * w if a == "l" else "-" * (w - 1) + ":" for w, a in zip(widths, align)]
        lines = [headers, rule, *cells]
        return "\n".join("| " + " | ".join(fit(c, i) for i, c in enumerate(line)) + " |" for line in lines)
    lines = [headers, ["-" * w for w in widths], *cells]
    return "\n".join("  ".join(fit(c, i) for i, c in enumerate(line)).rstrip() for line in lines)


def print_table(headers, rows, markdown=False, title=None):
    if title:
        print(title)
    print(format_table(headers, rows, markdown=markdown), flush=True)


def percent(value, std=None, digits=1):
    """`0.7123` -> `"71.2"`; with `std`, `"71.2 +- 1.3"`; None -> None."""
    if value is None:
        return None
    text = f"{100 * value:.{digits}f}"
    if std is not None:
        text += f" +- {100 * std:.{digits}f}"
    return text


def parse_labelled(spec):
    """`"LABEL=PATH"` -> `("LABEL", "PATH")`; a bare `"PATH"` is labelled by its base name."""
    if "=" in spec and not os.path.exists(spec):
        label, path = spec.split("=", 1)
        if label and path:
            return label, path
    path = spec.rstrip("/\\")
    return os.path.basename(path) or spec, spec


class Timer:
    """`with Timer() as t: ...` then `t.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = None
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False
