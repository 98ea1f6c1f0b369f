"""Choices between equivalent computations, made by measuring them on this machine.

Some kernels are fast on one CPU and slow on another (XLA's convolution
gradients on AVX2 against AVX-512, for one). Where byola_keras has two
formulations of one computation, `fastest()` times both once on the shapes at
hand and remembers the winner:

- in this process, for every later call with the same key;
- in a JSON file (`$BYOLA_AUTOTUNE_CACHE`, else `autotune.json` in
  `$BYOLA_KERAS_CACHE`, else in `$XDG_CACHE_HOME/byola-keras` or
  `~/.cache/byola-keras`; `BYOLA_AUTOTUNE_CACHE=off` keeps choices in memory
  only), under a key naming the CPU model, its vector extensions and the
  library versions, so that another machine or another jaxlib measures again.

`BYOLA_AUTOTUNE_<KIND>=<candidate>` (e.g. `BYOLA_AUTOTUNE_CONV_WEIGHT_GRAD=xla`)
skips the measurement and forces a candidate.

The timing runs in a thread of its own: JAX traces are per thread, so a
choice made while a training step is being traced runs real computations
instead of adding them to the traced program.
"""

import functools
import json
import os
import platform
import statistics
import threading
import time

_CHOICES = {}  # (machine, kind, key) -> name, this process
_LOCK = threading.Lock()
# CPU flags that change which kernels a library runs.
_ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cache_path():
    """The file that keeps choices between processes, or None (`off`)."""
    path = os.environ.get("BYOLA_AUTOTUNE_CACHE")
    if path is not None:
        return None if path.strip().lower() in ("", "off", "0", "none") else path
    from byola_keras import _files

    return os.path.join(_files.cache_root(), "autotune.json")


def machine_key(libraries=()):
    """CPU model, its vector extensions and `libraries` versions, as one string."""
    return " | ".join([_cpu(), *libraries])


@functools.lru_cache(maxsize=None)
def _cpu():
    model, flags = platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name":
                    model = value.strip()
                elif name == "flags":
                    flags = set(value.split())
                if model != platform.machine() and flags:
                    break
    except OSError:
        pass
    isa = "+".join(flag for flag in _ISA_FLAGS if flag in flags)
    return f"{model} | {isa}"


def _read(path):
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path, machine, entry_key, entry):
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        data = _read(path)
        data.setdefault(machine, {})[entry_key] = entry
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a measurement per process


def measure(candidates, repeats=3, clock=time.perf_counter):
    """Median seconds of each candidate (`{name: run}`; `run()` blocks until
    done; compile before, the first call is timed too), calls alternating
    between candidates. A candidate slower than twice the fastest one so far
    is not called again."""
    times = {name: [] for name in candidates}
    for repeat in range(repeats):
        best = min(min(t) for t in times.values()) if repeat else None
        for name, run in candidates.items():
            if best is not None and min(times[name]) > 2 * best:
                continue
            start = clock()
            run()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def fastest(kind, key, make_candidates, libraries=(), default=None, clock=time.perf_counter, share=None):
    """Name of the fastest candidate for `(kind, key)`, measured once per
    machine (see the module docstring).

    `make_candidates()` returns `{name: run}`; it is only called when a
    measurement is needed. `default` is returned, without measuring, when the
    kind is forced off (`BYOLA_AUTOTUNE_<KIND>=default`). `share(name,
    decide)`, where given, returns the choice every process of a job uses
    (process 0 runs `decide()`, which reads the file or measures, so that the
    processes compile one program; see
    `byola_keras.backend.multiprocess.shared_choice`)."""
    forced = os.environ.get(f"BYOLA_AUTOTUNE_{kind.upper()}")
    if forced:
        return default if forced == "default" else forced
    machine = machine_key(libraries)
    with _LOCK:
        if (machine, kind, key) not in _CHOICES:
            entry_key = f"{kind} {key}"
            decide = functools.partial(_decide, machine, kind, entry_key, make_candidates, clock)
            _CHOICES[(machine, kind, key)] = decide() if share is None else share(entry_key, decide)
        return _CHOICES[(machine, kind, key)]


def _decide(machine, kind, entry_key, make_candidates, clock):
    """The choice on file for this machine, else measured (and filed)."""
    path = cache_path()
    if path:
        entry = _read(path).get(machine, {}).get(entry_key)
        if isinstance(entry, dict) and isinstance(entry.get("choice"), str):
            return entry["choice"]
    result = {}

    def run():
        try:
            result["seconds"] = measure(make_candidates(), clock=clock)
        except BaseException as error:  # re-raised in the caller's thread
            result["error"] = error

    worker = threading.Thread(target=run, name=f"byola-autotune-{kind}")
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    seconds = result["seconds"]
    choice = min(seconds, key=seconds.get)
    if path:
        entry = {
            "choice": choice,
            "ms": {name: round(1000 * s, 3) for name, s in seconds.items()},
            "measured": time.strftime("%Y-%m-%d"),
        }
        _write(path, machine, entry_key, entry)
    return choice


def forget():
    """Drop this process's remembered choices (the file is kept)."""
    with _LOCK:
        _CHOICES.clear()
