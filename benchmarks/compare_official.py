"""Side by side on this machine: the official BYOL-A code and byola-keras's training step.

    python benchmarks/compare_official.py [--scratch DIR] [--shared ../shared]
        [--byol-a-git DIR] [--byol-pytorch-git DIR] [--cases v1-512 v1-2048 v2]
        [--backends jax tensorflow torch] [--steps 12] [--warmup 3] [--out JSON]
        [--max-isa avx2]
    python benchmarks/compare_official.py --table JSON   # the table of an earlier run

1. Builds the official code (nttcslab/byol-a, and lucidrains/byol-pytorch's
   `byol_pytorch.py` patched with byol-a's diff) at the commits pinned in
   `SHARED/official-harness/COMMITS.json`, with a virtual environment of its
   own, in a scratch folder outside the repository (default
   `~/.cache/byola-keras/official-scratch`), as
   `SHARED/official-harness/README.md` describes. The official code's licence
   allows evaluation only: it is never copied into this repository. The
   sources come from local git directories when given (`--byol-a-git`,
   `--byol-pytorch-git`), else from a clone of GitHub kept in the scratch
   folder; blobs a local copy lacks (the large pretrained weights) are skipped.
   A scratch folder whose files match the pins (git blob hashes) and whose
   environment imports the pinned torch is reused as it is.
2. Runs the harness `bench_official.py` on the training-step cases, one
   process per case, with glibc's default malloc (as the official code runs),
   with `--malloc reuse` (the setting byola-keras's command line uses on
   PyTorch and TensorFlow) and, where the machine allows it, with malloc on
   transparent huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, malloc's
   defaults: the command line's setting on JAX). `GLIBC_TUNABLES` of this
   shell is not passed on.
3. Runs `bench_train_step.py` for every backend and case, one process each
   (so each peak RSS is that case's), with the command line's malloc setting.
4. Prints one table of ratios (samples/s and peak RSS, byola-keras / official,
   against the official code as its users run it and with the same malloc
   setting as ours) with the CPU model and its vector extensions, and writes
   every figure to JSON (default `benchmarks/results/compare_official.json`).

`--max-isa avx2` caps the instruction set of every library in both codes
that takes a cap (`ISA_CAPS`: XLA's generated code, oneDNN, PyTorch's ATen and
MKL), to stand in for an AVX2 CPU on an AVX-512 one; the record says which
instruction set PyTorch and oneDNN reported using in each venv under the cap.
JAX's matrix products run in YNNPACK, which chooses its kernels from the CPU
and takes no cap, so the capped JAX figures are not an AVX2 CPU's.

Batch 64, per-view BatchNorm, the benchmarks' default steps (12 timed after 3
warm-up). Run it on a quiet machine: the figures measure whatever else runs.
"""

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CASES = ("v1-512", "v1-2048", "v2")
BACKENDS = ("jax", "tensorflow", "torch")
OFFICIAL_CASE = {"v1-512": "train-v1-512", "v1-1024": "train-v1-1024", "v1-2048": "train-v1-2048",
                 "v2": "train-v2"}
MALLOCS = ("default", "reuse", "huge-pages")
BYOL_A = "nttcslab/byol-a"
BYOL_PYTORCH = "lucidrains/byol-pytorch"
BYOL_PYTORCH_FILE = "byol_pytorch/byol_pytorch.py"
# The harness README's environment (torch's version is in its step 3).
TORCH_VERSION = "2.13.0"
OFFICIAL_PACKAGES = ("nnAudio", "librosa", "easydict", "pyyaml", "fire", "soundfile", "pandas")
OFFICIAL_IMPORTS = ("torch", "torchaudio", "nnAudio", "librosa", "easydict", "yaml", "fire", "soundfile",
                    "pandas")
# The variables that cap each library's instruction set, per `--max-isa` value:
# XLA's CPU code generation (JAX, and TensorFlow's XLA), oneDNN's kernels
# (TensorFlow with oneDNN, PyTorch's convolutions), PyTorch's own kernels, MKL.
ISA_CAPS = {
    "avx2": {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
# /proc/cpuinfo flags that say which vector instructions the CPU has.
_VECTOR_FLAG = re.compile(r"^(sse\d?\w*|ssse3|avx\w*|fma\w*|f16c|amx\w*|vnni\w*|avx512\w*)$")


# ----------------------------------------------------------------------------
# Pins and sources


def read_pins(shared):
    """The pinned commits and torchaudio version from `SHARED/official-harness/COMMITS.json`."""
    path = os.path.join(shared, "official-harness", "COMMITS.json")
    with open(path) as f:
        raw = json.load(f)

    def commit(key):
        match = re.search(r"\b[0-9a-f]{40}\b", str(raw.get(key, "")))
        if not match:
            raise SystemExit(f"{path}: no 40-digit commit for {key!r}")
        return match.group(0)

    byol_pytorch_key = next((k for k in raw if k.startswith(BYOL_PYTORCH)), BYOL_PYTORCH)
    torchaudio = re.match(r"\s*(\d+(?:\.\d+)+)", str(raw.get("torchaudio", "")))
    return {
        BYOL_A: commit(BYOL_A),
        BYOL_PYTORCH: commit(byol_pytorch_key),
        "torchaudio": torchaudio.group(1) if torchaudio else None,
        "torch": TORCH_VERSION,
    }


def _git(git_dir, *args, binary=False):
    out = subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True, check=True)
    return out.stdout if binary else out.stdout.decode()


def source_git_dir(repo, local, scratch):
    """A git directory holding `repo`: `local` if given, else a clone of GitHub
    kept in `SCRATCH/src` (fetched again when the pinned commit is missing)."""
    if local:
        if not os.path.isdir(local):
            raise SystemExit(f"{local}: not a folder (the git directory of {repo})")
        return local
    clone = os.path.join(scratch, "src", repo.replace("/", "+") + ".git")
    if not os.path.isdir(clone):
        subprocess.run(["git", "clone", "--bare", "--quiet", f"https://github.com/{repo}.git", clone], check=True)
    return clone


def blob_id(data):
    """Git's object id of a blob with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def tree_entries(git_dir, commit):
    """`[(path, mode, blob id, present)]` of every file of `commit`; `present`
    is False for blobs the git directory lacks (large files left out of a copy)."""
    entries = []
    listing = _git(git_dir, "ls-tree", "-r", "-z", "--full-tree", commit, binary=True)
    for item in listing.split(b"\0"):
        if not item:
            continue
        meta, path = item.split(b"\t", 1)
        mode, kind, sha = meta.decode().split()
        if kind != "blob":
            continue
        present = subprocess.run(["git", f"--git-dir={git_dir}", "cat-file", "-e", sha],
                                 capture_output=True).returncode == 0
        entries.append((path.decode(), mode, sha, present))
    return entries


def extract_tree(git_dir, commit, dest):
    """Writes the files of `commit` under `dest`, one by one (an archive of the
    whole commit fails on missing blobs). Returns the paths skipped as missing."""
    skipped = []
    for path, mode, sha, present in tree_entries(git_dir, commit):
        if not present:
            skipped.append(path)
            continue
        target = os.path.join(dest, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(_git(git_dir, "cat-file", "blob", sha, binary=True))
        os.chmod(target, 0o755 if mode == "100755" else 0o644)
    return skipped


def tree_matches(git_dir, commit, dest):
    """Whether every present file of `commit` is under `dest` with the same content."""
    for path, _, sha, present in tree_entries(git_dir, commit):
        if not present:
            continue
        try:
            with open(os.path.join(dest, path), "rb") as f:
                if blob_id(f.read()) != sha:
                    return False
        except OSError:
            return False
    return True


def patched_byol_pytorch(git_dir, commit, diff_path):
    """lucidrains' `byol_pytorch.py` at `commit`, patched with byol-a's diff (bytes)."""
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "byol_pytorch.py")
        with open(target, "wb") as f:
            f.write(_git(git_dir, "show", f"{commit}:{BYOL_PYTORCH_FILE}", binary=True))
        with open(diff_path, "rb") as diff:
            subprocess.run(["patch", "--quiet", target], stdin=diff, check=True)
        with open(target, "rb") as f:
            return f.read()


# ----------------------------------------------------------------------------
# The scratch folder


def _venv_python(scratch):
    return os.path.join(scratch, "venv", "bin", "python")


def venv_ready(scratch, pins):
    """Whether the scratch venv imports every package the harness needs, with the pinned torch."""
    python = _venv_python(scratch)
    if not os.path.exists(python):
        return False
    check = ("import importlib, torch; [importlib.import_module(m) for m in %r]; "
             "print(torch.__version__.split('+')[0])" % (OFFICIAL_IMPORTS,))
    out = subprocess.run([python, "-c", check], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [pins["torch"]]


def build_venv(scratch, pins, python, torch_index_url=None):
    """The harness README's step 3: a venv with the pinned CPU torch and the
    official code's dependencies; torchaudio without dependencies, its compiled
    extension moved aside (the pure-Python transforms then import)."""
    venv = os.path.join(scratch, "venv")
    subprocess.run([python, "-m", "venv", "--clear", venv], check=True)
    pip = [_venv_python(scratch), "-m", "pip", "install", "--quiet"]
    torch_args = ["--index-url", torch_index_url] if torch_index_url else []
    subprocess.run([*pip, f"torch=={pins['torch']}", *torch_args], check=True)
    subprocess.run([*pip, *OFFICIAL_PACKAGES], check=True)
    torchaudio = "torchaudio" + (f"=={pins['torchaudio']}" if pins["torchaudio"] else "")
    subprocess.run([*pip, "--no-deps", torchaudio], check=True)
    site = subprocess.run(
        [_venv_python(scratch), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    lib = os.path.join(site, "torchaudio", "lib")
    aside = os.path.join(venv, "torchaudio_lib_aside")
    if os.path.isdir(lib):
        os.makedirs(aside, exist_ok=True)
        for name in os.listdir(lib):
            if ".so" in name:
                shutil.move(os.path.join(lib, name), os.path.join(aside, name))


def _write_if_changed(data, dst):
    """Writes `data` to `dst` unless it holds them already (renamed into place)."""
    try:
        with open(dst, "rb") as f:
            if f.read() == data:
                return
    except OSError:
        pass
    tmp = f"{dst}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dst)


def prepare_scratch(scratch, shared, pins, byol_a_git=None, byol_pytorch_git=None, python=None,
                    torch_index_url=None, log=print):
    """Builds (or checks and reuses) the scratch folder; returns what was done."""
    scratch = os.path.abspath(scratch)
    if os.path.commonpath([scratch, REPO]) == REPO:
        raise SystemExit(f"--scratch {scratch} is inside the repository: the official code must stay outside it.")
    os.makedirs(scratch, exist_ok=True)
    done = {"scratch": scratch}
    code = os.path.join(scratch, "byol-a")
    git_a = source_git_dir(BYOL_A, byol_a_git, scratch)
    if os.path.isdir(code) and tree_matches(git_a, pins[BYOL_A], code):
        done["byol-a"] = "reused (files match the pinned commit)"
    else:
        if os.path.isdir(code):
            shutil.rmtree(code)
        skipped = extract_tree(git_a, pins[BYOL_A], code)
        done["byol-a"] = f"extracted at {pins[BYOL_A][:12]}"
        done["byol-a skipped (not in the git directory)"] = skipped
    git_p = source_git_dir(BYOL_PYTORCH, byol_pytorch_git, scratch)
    learner = patched_byol_pytorch(git_p, pins[BYOL_PYTORCH], os.path.join(code, "byol_a", "byol_pytorch.diff"))
    for package in ("byol_a", os.path.join("v2", "byol_a2")):
        _write_if_changed(learner, os.path.join(code, package, "byol_pytorch.py"))
    harness = os.path.join(shared, "official-harness")
    for name in ("bench_official.py", "COMMITS.json"):
        with open(os.path.join(harness, name), "rb") as f:
            _write_if_changed(f.read(), os.path.join(scratch, name))
    if venv_ready(scratch, pins):
        done["venv"] = "reused"
    else:
        log(f"Building the official code's environment in {scratch}/venv (about 5 minutes)")
        build_venv(scratch, pins, python or sys.executable, torch_index_url)
        if not venv_ready(scratch, pins):
            raise SystemExit(f"{scratch}/venv does not import {', '.join(OFFICIAL_IMPORTS)} with torch {pins['torch']}")
        done["venv"] = "built"
    return done


# ----------------------------------------------------------------------------
# Runs


def run_official(scratch, cases, malloc, steps, warmup, out, max_isa=None, log=print):
    """The harness on `cases` (one process per case) with `malloc` (one of
    `MALLOCS`); its JSON record."""
    env = capped_environment(_without_tunables(os.environ), max_isa)
    if malloc == "huge-pages":
        env["GLIBC_TUNABLES"] = _allocator().tunables_with_huge_pages()
    cmd = [_venv_python(scratch), "bench_official.py", "--cases", *[OFFICIAL_CASE[c] for c in cases],
           "--malloc", "reuse" if malloc == "reuse" else "default", "--warmup", str(warmup), "--out", out]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    log(("GLIBC_TUNABLES=" + env["GLIBC_TUNABLES"] + " " if "GLIBC_TUNABLES" in env else "") + "$ " + " ".join(cmd))
    result = subprocess.run(cmd, cwd=scratch, env=env, check=False)
    if not os.path.exists(out):
        return {"results": [{"case": OFFICIAL_CASE[c], "error": f"exit {result.returncode}"} for c in cases]}
    with open(out) as f:
        return json.load(f)


def run_ours(backend, case, steps, warmup, out, max_isa=None, log=print):
    """`bench_train_step.py` for one backend and case in its own process; its JSON record."""
    cmd = [sys.executable, os.path.join(HERE, "bench_train_step.py"), "--backend", backend, "--cases", case,
           "--batch", "64", "--warmup", str(warmup), "--out", out]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    log("$ " + " ".join(cmd))
    env = {**capped_environment(_without_tunables(os.environ), max_isa), "KERAS_BACKEND": backend}
    result = subprocess.run(cmd, env=env, check=False)
    if result.returncode != 0:
        return {"error": f"exit {result.returncode}", "backend": backend, "results": []}
    with open(out) as f:
        return json.load(f)


def capped_environment(environ, max_isa):
    """`environ` with every library's instruction set capped at `max_isa` (a
    key of `ISA_CAPS`; None: `environ` as it is). XLA's flag is added to
    `XLA_FLAGS`, replacing an earlier `--xla_cpu_max_isa`."""
    env = dict(environ)
    if max_isa is None:
        return env
    for name, value in ISA_CAPS[max_isa].items():
        if name == "XLA_FLAGS":
            flag = value.split("=")[0]
            kept = [f for f in env.get(name, "").split() if f.split("=")[0] != flag]
            value = " ".join(kept + [value])
        env[name] = value
    return env


_ISA_PROBE = """
import json, torch
x = torch.randn(2, 4, 32, 32)
torch.nn.functional.conv2d(x, torch.randn(8, 4, 3, 3), padding=1)
print(json.dumps({"torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}))
"""


def isa_in_use(python, max_isa):
    """What PyTorch's ATen and oneDNN report using in `python`'s environment
    under the cap: `{"torch_cpu_capability": ..., "onednn_isa": ...}` (oneDNN's
    from `ONEDNN_VERBOSE`; None where it printed none)."""
    env = {**capped_environment(_without_tunables(os.environ), max_isa), "ONEDNN_VERBOSE": "1"}
    out = subprocess.run([python, "-c", _ISA_PROBE], env=env, capture_output=True, text=True)
    report = {"torch_cpu_capability": None, "onednn_isa": None}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            report.update(json.loads(line))
        match = re.search(r"\bisa:([^,]+)", line)
        if match and report["onednn_isa"] is None:
            report["onednn_isa"] = match.group(1).strip()
    return report


def _without_tunables(environ):
    return {k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}


def _allocator():
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from byola_keras import allocator  # no Keras import

    return allocator


def mallocs_here():
    """The official runs this machine allows (huge pages: glibc >= 2.35 and THP on)."""
    return [m for m in MALLOCS if m != "huge-pages" or _allocator().huge_pages_possible()]


# ----------------------------------------------------------------------------
# Machine and table


def cpu_info(cpuinfo="/proc/cpuinfo"):
    """`{"model": ..., "vector_extensions": [...]}` from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.processor(), platform.machine()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    return {"model": model, "vector_extensions": sorted({f for f in flags if _VECTOR_FLAG.match(f)})}


def comparison_rows(record):
    """One row per (case, backend): our samples/s and peak RSS, the official
    code's under each malloc setting, and the ratios ours / official."""
    official = {}
    for malloc, rec in record.get("official", {}).items():
        for r in rec.get("results", []):
            if "error" not in r:
                official[(malloc, r["case"])] = r
    rows = []
    for run in record.get("ours", []):
        for r in run.get("results", []):
            row = {"case": r["case"], "backend": run["backend"], "malloc": our_malloc(run),
                   "samples_per_s": r["samples_per_s_median"],
                   "peak_rss_mib": run.get("memory", {}).get("peak_rss_mib")}
            for malloc in MALLOCS:
                o = official.get((malloc, OFFICIAL_CASE[r["case"]]))
                rate = o and o.get("samples_per_s_median")
                rss = o and o.get("peak_rss_mib")
                row[f"official_{malloc}_samples_per_s"] = rate
                row[f"official_{malloc}_peak_rss_mib"] = rss
                row[f"speed_ratio_{malloc}"] = _ratio(row["samples_per_s"], rate)
                row[f"rss_ratio_{malloc}"] = _ratio(row["peak_rss_mib"], rss)
            for key in ("official_{}_samples_per_s", "official_{}_peak_rss_mib", "speed_ratio_{}", "rss_ratio_{}"):
                row[key.format("same")] = row[key.format(row["malloc"])]
            rows.append(row)
    order = {c: i for i, c in enumerate(OFFICIAL_CASE)}
    rows.sort(key=lambda r: (order.get(r["case"], len(order)), r["backend"]))
    return rows


def our_malloc(run):
    """The malloc setting of one of our runs, as a key of `MALLOCS` (records
    written before the field existed used freed memory reused)."""
    if _allocator().huge_pages_requested(run.get("glibc_tunables")) and not run.get("malloc_reuse_freed_memory"):
        return "huge-pages"
    return "default" if run.get("malloc_reuse_freed_memory") is False else "reuse"


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def _cell(value, fmt):
    return "-" if value is None else fmt.format(value)


def _cap_lines(record):
    """The table's line on the instruction-set cap, where the run had one."""
    if not record.get("max_isa"):
        return []
    env = " ".join(f"{k}={v}" for k, v in ISA_CAPS.get(record["max_isa"], {}).items())
    used = "; ".join(f"{where}: PyTorch {r.get('torch_cpu_capability') or '?'}, oneDNN {r.get('onednn_isa') or '?'}"
                     for where, r in record.get("isa_in_use", {}).items())
    return [f"instruction set capped at {record['max_isa'].upper()} in both codes ({env})"
            + (f"; reported in use: {used}" if used else "")]


def format_table(record):
    """The comparison as Markdown: a header naming machine and date, then the table."""
    cpu = record.get("cpu", {})
    load = record.get("load_average") or {}
    lines = [
        f"byola-keras vs the official BYOL-A code, {record.get('date', '?')}, batch 64, per-view BatchNorm",
        f"CPU: {cpu.get('model', '?')}, {record.get('usable_cores', '?')} cores; vector extensions: "
        f"{' '.join(cpu.get('vector_extensions', [])) or '?'}",
        f"load average before / after: {load.get('before', '?')} / {load.get('after', '?')}",
        *_cap_lines(record),
        "ratios: byola-keras / official (>1 = faster, or more memory); official: glibc's default malloc "
        "(as its users run it) | the same malloc setting as ours (malloc: `reuse` = freed memory reused, "
        "`huge-pages` = GLIBC_TUNABLES=glibc.malloc.hugetlb=1 with malloc's defaults, `default`)",
        "",
        "| case | backend | malloc | samples/s | official | x | official, same malloc | x | peak RSS MiB "
        "| official | x | official, same malloc | x |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in comparison_rows(record):
        lines.append("| " + " | ".join([
            r["case"], r["backend"], r["malloc"], _cell(r["samples_per_s"], "{:.1f}"),
            _cell(r["official_default_samples_per_s"], "{:.1f}"), _cell(r["speed_ratio_default"], "{:.2f}"),
            _cell(r["official_same_samples_per_s"], "{:.1f}"), _cell(r["speed_ratio_same"], "{:.2f}"),
            _cell(r["peak_rss_mib"], "{:,.0f}"),
            _cell(r["official_default_peak_rss_mib"], "{:,.0f}"), _cell(r["rss_ratio_default"], "{:.2f}"),
            _cell(r["official_same_peak_rss_mib"], "{:,.0f}"), _cell(r["rss_ratio_same"], "{:.2f}"),
        ]) + " |")
    failed = [f"{run.get('backend')}: {run['error']}" for run in record.get("ours", []) if "error" in run]
    failed += [f"official {m} {r['case']}: {r['error']}" for m, rec in record.get("official", {}).items()
               for r in rec.get("results", []) if "error" in r]
    if failed:
        lines += ["", "failed: " + "; ".join(failed)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------


def default_scratch():
    root = os.environ.get("BYOLA_KERAS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "byola-keras")
    return os.path.join(root, "official-scratch")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=os.environ.get("BYOLA_SHARED") or os.path.join(REPO, "..", "shared"),
                   help="The steering folder with official-harness/ (default $BYOLA_SHARED, else ../shared).")
    p.add_argument("--scratch", default=default_scratch(),
                   help="Scratch folder for the official code, outside the repository "
                        "(default ~/.cache/byola-keras/official-scratch).")
    p.add_argument("--byol-a-git", help="Local git directory of nttcslab/byol-a (default: clone GitHub).")
    p.add_argument("--byol-pytorch-git", help="Local git directory of lucidrains/byol-pytorch (default: clone GitHub).")
    p.add_argument("--python", default=None, help="Python that creates the official venv (default: this one).")
    p.add_argument("--torch-index-url", default=None,
                   help="Package index of CPU torch wheels for the official venv, where the default index "
                        "serves GPU builds.")
    p.add_argument("--cases", nargs="+", choices=sorted(OFFICIAL_CASE), default=list(CASES))
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--steps", type=int, default=None, help="Timed steps (default: the benchmarks' 12).")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=os.path.join(HERE, "results", "compare_official.json"))
    p.add_argument("--max-isa", choices=sorted(ISA_CAPS), default=None,
                   help="Cap the instruction set of every library that takes a cap, in both codes "
                        "(e.g. avx2 on an AVX-512 CPU; JAX's matrix products take none).")
    p.add_argument("--table", metavar="JSON", help="Print the table of an earlier run's JSON and stop.")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(format_table(json.load(f)))
        return 0
    shared = os.path.abspath(args.shared)
    if not os.path.isfile(os.path.join(shared, "official-harness", "bench_official.py")):
        raise SystemExit(f"--shared {shared}: no official-harness/bench_official.py there")
    pins = read_pins(shared)
    started = time.time()
    record = {
        "benchmark": "compare_official",
        "date": time.strftime("%Y-%m-%d"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": cpu_info(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "pins": pins,
        "cases": args.cases,
        "backends": args.backends,
        "load_average": {"before": [round(x, 2) for x in os.getloadavg()]},
        "max_isa": args.max_isa,
    }
    record["scratch"] = prepare_scratch(args.scratch, shared, pins, args.byol_a_git, args.byol_pytorch_git,
                                        args.python, args.torch_index_url)
    if args.max_isa:
        record["isa_in_use"] = {"official": isa_in_use(_venv_python(record["scratch"]["scratch"]), args.max_isa)}
        if "torch" in args.backends:
            record["isa_in_use"]["ours"] = isa_in_use(sys.executable, args.max_isa)
    work = os.path.join(os.path.dirname(os.path.abspath(args.out)), "compare_official")
    os.makedirs(work, exist_ok=True)
    record["official"] = {
        malloc: run_official(record["scratch"]["scratch"], args.cases, malloc, args.steps, args.warmup,
                             os.path.join(work, f"official-{malloc}.json"), args.max_isa)
        for malloc in mallocs_here()
    }
    record["ours"] = [
        run_ours(backend, case, args.steps, args.warmup, os.path.join(work, f"{backend}-{case}.json"), args.max_isa)
        for backend in args.backends for case in args.cases
    ]
    record["load_average"]["after"] = [round(x, 2) for x in os.getloadavg()]
    record["rows"] = comparison_rows(record)
    record["wall_s"] = round(time.time() - started, 1)
    tmp = f"{args.out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, args.out)
    print(format_table(record))
    print(f"wrote {args.out} ({record['wall_s'] / 60:.0f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
