"""`benchmarks/compare_official.py`: its table, its pins and its source extraction.

The official code is never built here: the table is computed from fixture
records shaped like `bench_official.py`'s and `bench_train_step.py`'s JSON,
and the extraction runs on a small git repository made in the test, one of
whose blobs is removed (as the large weight files are missing from a stored
copy of the official repository).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import compare_official  # noqa: E402


def official(malloc, rows):
    return {"benchmark": "official-byol-a", "malloc": malloc, "results": [
        {"case": case, "samples_per_s_median": rate, "peak_rss_mib": rss} for case, rate, rss in rows
    ]}


def ours(backend, case, rate, rss, reuse=True, tunables=""):
    return {"backend": backend, "memory": {"peak_rss_mib": rss}, "malloc_reuse_freed_memory": reuse,
            "glibc_tunables": tunables, "results": [{"case": case, "samples_per_s_median": rate}]}


RECORD = {
    "date": "2026-12-06",
    "cpu": {"model": "Test CPU", "vector_extensions": ["avx", "avx2", "fma"]},
    "usable_cores": 2,
    "load_average": {"before": [0.1, 0.2, 0.3], "after": [1.0, 1.0, 1.0]},
    "official": {
        "default": official("default", [("train-v1-2048", 10.0, 2000.0), ("train-v2", 8.0, 2500.0)]),
        "reuse": official("reuse", [("train-v1-2048", 12.5, 2400.0)]),
        "huge-pages": official("huge-pages", [("train-v1-2048", 16.0, 1600.0)]),
    },
    "ours": [ours("torch", "v1-2048", 20.0, 1800.0), ours("jax", "v1-2048", 5.0, 3000.0),
             ours("jax", "v2", 4.0, 2000.0),
             ours("jax", "v1-2048", 8.0, 2000.0, reuse=False, tunables="glibc.malloc.hugetlb=1")],
}


def test_rows_divide_ours_by_each_official_run():
    rows = {(r["case"], r["backend"], r["malloc"]): r for r in compare_official.comparison_rows(RECORD)}
    torch_row = rows[("v1-2048", "torch", "reuse")]
    assert torch_row["speed_ratio_default"] == 2.0
    assert torch_row["speed_ratio_reuse"] == 1.6
    assert torch_row["rss_ratio_default"] == 0.9
    assert torch_row["rss_ratio_reuse"] == 0.75
    jax_row = rows[("v1-2048", "jax", "reuse")]
    assert jax_row["speed_ratio_default"] == 0.5 and jax_row["rss_ratio_reuse"] == 1.25
    # No official v2 run with --malloc reuse: no ratio rather than a wrong one.
    v2 = rows[("v2", "jax", "reuse")]
    assert v2["speed_ratio_default"] == 0.5 and v2["speed_ratio_reuse"] is None
    # The same malloc setting as ours: freed memory reused, or huge pages.
    assert torch_row["malloc"] == "reuse" and torch_row["speed_ratio_same"] == 1.6
    huge = [r for r in compare_official.comparison_rows(RECORD) if r["malloc"] == "huge-pages"]
    assert len(huge) == 1 and huge[0]["speed_ratio_same"] == 0.5 and huge[0]["rss_ratio_same"] == 1.25
    assert huge[0]["speed_ratio_default"] == 0.8
    # Case order as the harness lists them, then backend.
    assert [(r["case"], r["backend"]) for r in compare_official.comparison_rows(RECORD)] == [
        ("v1-2048", "jax"), ("v1-2048", "jax"), ("v1-2048", "torch"), ("v2", "jax")]


def test_our_malloc_setting_is_read_from_the_run_record():
    huge = "glibc.malloc.hugetlb=1"
    assert compare_official.our_malloc(ours("jax", "v2", 1, 1, reuse=False, tunables=huge)) == "huge-pages"
    assert compare_official.our_malloc(ours("jax", "v2", 1, 1, reuse=False)) == "default"
    assert compare_official.our_malloc(ours("torch", "v2", 1, 1, reuse=True, tunables=huge)) == "reuse"
    assert compare_official.our_malloc({"backend": "jax", "results": []}) == "reuse"  # records from before the field


def test_table_names_machine_date_and_failures():
    record = json.loads(json.dumps(RECORD))
    record["ours"].append({"backend": "tensorflow", "error": "exit 137", "results": []})
    table = compare_official.format_table(record)
    assert "2026-12-06" in table and "Test CPU" in table and "avx2" in table
    line = next(l for l in table.splitlines() if l.startswith("| v1-2048 | torch"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:8] == ["reuse", "20.0", "10.0", "2.00", "12.5", "1.60"]
    assert cells[8:] == ["1,800", "2,000", "0.90", "2,400", "0.75"]
    assert "tensorflow: exit 137" in table
    v2 = next(l for l in table.splitlines() if l.startswith("| v2 | jax"))
    assert v2.count(" - ") == 4  # official reuse rate and RSS, and their ratios
    huge = next(l for l in table.splitlines() if l.startswith("| v1-2048 | jax | huge-pages"))
    assert [c.strip() for c in huge.strip("|").split("|")][3:8] == ["8.0", "10.0", "0.80", "16.0", "0.50"]


def test_cpu_info_keeps_vector_extensions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu sse sse2 ssse3 avx avx2 avx512f avx512_vnni fma aes\n"
                       "model name\t: Some CPU\nflags\t\t: fpu\n")
    info = compare_official.cpu_info(str(cpuinfo))
    assert info["model"] == "Some CPU"
    assert info["vector_extensions"] == ["avx", "avx2", "avx512_vnni", "avx512f", "fma", "sse", "sse2", "ssse3"]


def test_read_pins(tmp_path):
    harness = tmp_path / "official-harness"
    harness.mkdir()
    (harness / "COMMITS.json").write_text(json.dumps({
        "nttcslab/byol-a": "a" * 40,
        "lucidrains/byol-pytorch byol_pytorch/byol_pytorch.py": "b" * 40 + " (patched)",
        "torchaudio": "2.11.1 PyPI wheel",
    }))
    pins = compare_official.read_pins(str(tmp_path))
    assert pins["nttcslab/byol-a"] == "a" * 40
    assert pins["lucidrains/byol-pytorch"] == "b" * 40
    assert pins["torchaudio"] == "2.11.1"


def git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_extract_skips_missing_blobs_and_checks_content(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "code.py").write_text("print('hi')\n")
    (repo / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(repo / "run.sh", 0o755)
    (repo / "weights.pth").write_bytes(b"\0" * 1000)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "x")
    commit = git(repo, "rev-parse", "HEAD")
    weights = git(repo, "rev-parse", "HEAD:weights.pth")
    os.remove(repo / ".git" / "objects" / weights[:2] / weights[2:])  # a stored copy without the large file
    dest = tmp_path / "out"
    skipped = compare_official.extract_tree(str(repo / ".git"), commit, str(dest))
    assert skipped == ["weights.pth"]
    assert (dest / "pkg" / "code.py").read_text() == "print('hi')\n"
    assert os.access(dest / "run.sh", os.X_OK) and not os.access(dest / "pkg" / "code.py", os.X_OK)
    assert compare_official.tree_matches(str(repo / ".git"), commit, str(dest))
    (dest / "pkg" / "code.py").write_text("print('changed')\n")
    assert not compare_official.tree_matches(str(repo / ".git"), commit, str(dest))


def test_isa_cap_sets_every_library_and_keeps_other_xla_flags():
    environ = {"XLA_FLAGS": "--xla_cpu_max_isa=AVX512 --xla_force_host_platform_device_count=2", "HOME": "/h"}
    env = compare_official.capped_environment(environ, "avx2")
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", "--xla_cpu_max_isa=AVX2"]
    assert (env["ONEDNN_MAX_CPU_ISA"], env["ATEN_CPU_CAPABILITY"], env["MKL_ENABLE_INSTRUCTIONS"]) == (
        "AVX2", "avx2", "AVX2")
    assert env["HOME"] == "/h" and environ["XLA_FLAGS"].startswith("--xla_cpu_max_isa=AVX512")
    assert compare_official.capped_environment(environ, None) == environ
    assert compare_official.build_parser().parse_args(["--max-isa", "avx2"]).max_isa == "avx2"
    with pytest.raises(SystemExit):
        compare_official.build_parser().parse_args(["--max-isa", "avx9"])


def test_table_names_the_isa_cap_and_what_each_venv_reported():
    record = json.loads(json.dumps(RECORD))
    assert "capped" not in compare_official.format_table(record)
    record["max_isa"] = "avx2"
    record["isa_in_use"] = {"official": {"torch_cpu_capability": "AVX2", "onednn_isa": "Intel AVX2"},
                            "ours": {"torch_cpu_capability": "AVX2", "onednn_isa": None}}
    line = next(l for l in compare_official.format_table(record).splitlines() if "capped" in l)
    assert "AVX2 in both codes" in line and "ONEDNN_MAX_CPU_ISA=AVX2" in line
    assert "official: PyTorch AVX2, oneDNN Intel AVX2" in line and "ours: PyTorch AVX2, oneDNN ?" in line
