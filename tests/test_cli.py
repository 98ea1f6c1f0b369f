"""The `byola-keras` command line: help and argument errors without a backend,
and one line with exit code 2 for every bad input."""

import fnmatch
import json
import os
import re
import subprocess
import sys

import pytest

from byola_keras import cli

BACKEND_MODULES = ("keras", "tensorflow", "jax", "torch")


def _in_fresh_process(cases, tmp_path):
    """Runs `cli.main(argv)` for each case in one new process; returns
    `(results, backend modules imported)` where results are `(exit code, stderr)`."""
    script = (
        "import contextlib, io, json, sys\n"
        "from byola_keras import cli\n"
        "results = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    err, out = io.StringIO(), io.StringIO()\n"
        "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            code = cli.main(argv)\n"
        "        except SystemExit as exit:\n"
        "            code = exit.code\n"
        "    results.append([code, err.getvalue(), out.getvalue()])\n"
        f"loaded = [m for m in {BACKEND_MODULES!r} if m in sys.modules]\n"
        "print(json.dumps([results, loaded]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
        timeout=300, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_imports_no_backend(tmp_path):
    cases = [["--help"], *([name, "--help"] for name in cli.COMMANDS)]
    results, loaded = _in_fresh_process(cases, tmp_path)
    assert loaded == []
    for argv, (code, _, out) in zip(cases, results):
        assert code == 0, argv
        assert out.startswith("usage: byola-keras"), argv
    pretrain_help = results[1 + list(cli.COMMANDS).index("pretrain")][2]
    for flag in ("--alpha", "--memory-size", "--freq-scale", "--time-scale", "--virtual-crop-scale",
                 "--fader-gain", "--checkpoint-every", "--restart", "--backend"):
        assert flag in pretrain_help
    assert "v1 0.4, v2 0.2" in pretrain_help  # alpha defaults from byola_keras.defaults


# (arguments after `pretrain`, what the one line must say)
BAD_PRETRAIN_ARGUMENTS = [
    (["--lr", "-1"], "argument --lr: must be > 0"),
    (["--lr", "0"], "argument --lr: must be > 0"),
    (["--lr", "nan"], "argument --lr: must be finite"),
    (["--dim", "0"], "argument --dim: must be >= 1"),
    (["--dim", "64.5"], "argument --dim: expected an integer >= 1"),
    (["--workers", "-1"], "argument --workers: must be >= 0"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["--batch-size", "many"], "argument --batch-size: expected an integer >= 1"),
    (["--epochs", "0"], "argument --epochs: must be >= 1"),
    (["--steps-per-epoch", "-3"], "argument --steps-per-epoch: must be >= 1"),
    (["--seed", "-1"], "argument --seed: must be >= 0"),
    (["--alpha", "1.5"], "argument --alpha: must be in [0, 1]"),
    (["--memory-size", "0"], "argument --memory-size: must be >= 1"),
    (["--freq-scale", "2", "1"], "argument --freq-scale: LO must be <= HI"),
    (["--time-scale", "0", "1"], "argument --time-scale: must be > 0"),
    (["--time-scale", "0.6"], "argument --time-scale: expected 2 arguments"),
    (["--virtual-crop-scale", "0.5", "1.5"], "argument --virtual-crop-scale: must be >= 1"),
    (["--fader-gain", "-1"], "argument --fader-gain: must be >= 0"),
    (["--checkpoint-every", "0"], "argument --checkpoint-every: must be >= 1"),
    (["--host-devices", "2"], "argument --host-devices: only used with --data-parallel"),
    (["--coordinator", "h:1"], "arguments --coordinator, --num-processes, --process-id: give all three"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     "argument --process-id: must be < --num-processes 2"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "0", "--detect-cluster"],
     "argument --detect-cluster: not with --coordinator"),
    (["--num-processes", "0"], "argument --num-processes: must be >= 1"),
    (["--version", "v3"], "argument --version: invalid choice"),
    (["--mixed-precision", "fp8"], "argument --mixed-precision: invalid choice"),
    (["--backend", "numpy"], "argument --backend: invalid choice"),
    (["--verbose", "3"], "argument --verbose: invalid choice"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--out", "{file}"], "argument --out: '{file}' exists and is not a folder"),
    (["--cache-dir", "{file}"], "argument --cache-dir: '{file}' exists and is not a folder"),
    (["{missing}"], "argument audio_dir: '{missing}' does not exist"),
    (["{file}"], "argument audio_dir: '{file}' is not a folder"),
    (["--config", "{missing}"], "argument --config: '{missing}' does not exist"),
    (["--config", "{broken}"], "argument --config: '{broken}' is not valid JSON"),
    (["--config", "{list}"], "argument --config: '{list}' must hold a JSON object"),
    (["--config", "{folder}"], "argument --config: '{folder}' is a folder"),
]


def test_every_bad_pretrain_argument_is_one_line_and_exit_code_2(tmp_path):
    names = {
        "file": tmp_path / "a_file.txt", "missing": tmp_path / "missing",
        "broken": tmp_path / "broken.json", "list": tmp_path / "list.json", "folder": tmp_path / "folder",
    }
    names["file"].write_text("not a folder")
    names["broken"].write_text('{"dim": 64,')
    names["list"].write_text("[1, 2]")
    names["folder"].mkdir()
    fill = {k: str(v) for k, v in names.items()}
    cases = [
        ["pretrain", *(a.format(**fill) for a in argv), "--out", str(tmp_path / "out")]
        if "--out" not in argv else ["pretrain", *(a.format(**fill) for a in argv)]
        for argv, _ in BAD_PRETRAIN_ARGUMENTS
    ]
    results, loaded = _in_fresh_process(cases, tmp_path)
    assert loaded == []  # refused before any backend starts
    for (argv, expected), (code, err, out) in zip(BAD_PRETRAIN_ARGUMENTS, results):
        assert code == 2, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("byola-keras"), (argv, lines)
        assert expected.format(**fill) in lines[0], (argv, lines)
        assert out == "", argv
    assert not (tmp_path / "out").exists()


BAD_CONFIG_SETTINGS = [
    ({"dimm": 64}, "Unknown pretraining setting(s): ['dimm']"),
    ({"dim": 0}, "Setting dim (--dim) must be an integer >= 1; got 0."),
    ({"lr": -0.1}, "Setting lr (--lr) must be a number > 0; got -0.1."),
    ({"batch_size": "8"}, "Setting batch_size (--batch-size) must be an integer >= 1; got '8'."),
    ({"freq_scale": [1.5, 0.6]}, "Setting freq_scale (--freq-scale) must be 0 < LO <= HI"),
    ({"alpha": 3}, "Setting alpha (--alpha) must be in [0, 1]; got 3."),
    ({"use_mixup": "yes"}, "Setting use_mixup (--use-mixup) must be true or false"),
    ({"version": "v3"}, "version must be 'v1' or 'v2'"),
]


@pytest.mark.parametrize("settings,expected", BAD_CONFIG_SETTINGS)
def test_bad_config_settings_stop_before_decoding(tmp_path, capsys, monkeypatch, settings, expected):
    monkeypatch.setenv("BYOLA_REUSE_FREED_MEMORY", "0")  # leave this process's malloc alone
    config = tmp_path / "best.json"
    config.write_text(json.dumps({"settings": settings}))
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "clip.wav").write_bytes(b"RIFF not really a wave file")
    code = cli.main(["pretrain", str(audio), "--config", str(config), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 2
    assert out.strip().splitlines() == [out.strip()]  # one line
    assert expected in out
    assert "LogMelCache" not in out  # nothing decoded


def test_malloc_setting_only_for_pretrain(tmp_path):
    """The glibc malloc tweak (byola_keras.allocator) is applied for `pretrain`
    on a CPU, not for the other subcommands, and told the backend."""
    config = tmp_path / "bad.json"
    config.write_text('{"dimm": 1}')
    script = (
        "import json, sys\n"
        "from byola_keras import allocator, cli\n"
        "calls = []\n"
        "allocator.reuse_freed_memory_unless_disabled = lambda backend: calls.append(backend)\n"
        "codes = [cli.main(['convert', 'missing.pth', '--out', 'x.keras', '--stats', '0', '1'])]\n"
        "codes.append(cli.main(['pretrain', '--config', sys.argv[2], '--out', 'o']))\n"
        "print(json.dumps([codes, calls]))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", script, "x", str(config)], capture_output=True, text=True,
        timeout=300, env=env, cwd=tmp_path,
    )
    codes, calls = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes == [2, 2] and calls == [os.environ["KERAS_BACKEND"]], done.stdout + done.stderr


def test_the_backend_given_to_the_start_up_settings_is_read_as_keras_reads_it(tmp_path, monkeypatch):
    """Without `--backend`, the backend `main` hands to the malloc and
    compilation-cache settings is `KERAS_BACKEND`, else `keras.json`'s, else
    TensorFlow (Keras's default), without importing a backend."""
    from byola_keras import cli

    monkeypatch.delenv("KERAS_BACKEND")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert cli._select_backend(None) == "tensorflow"  # Keras's default without a keras.json
    (tmp_path / "keras.json").write_text('{"backend": "jax", "floatx": "float32"}')
    assert cli._select_backend(None) == "jax"
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    assert cli._select_backend(None) == "torch"
    (tmp_path / "keras.json").write_text("{not json")
    monkeypatch.delenv("KERAS_BACKEND")
    assert cli._select_backend(None) == "tensorflow"
    assert "KERAS_BACKEND" not in os.environ  # left for Keras to read from keras.json


# Write failures of `byola-keras pretrain` (the test hook `BYOLA_TEST_WRITE_FAIL`
# makes the N-th write of a file matching PATTERN fail with ERRNO, after its data
# is written): (hook, what the one line names, errno name, what it says of the
# checkpoints). The cases run in this order, one `pretrain` each, on one output
# folder: every run picks up what the failed one before it left.
WRITE_FAULTS = [
    ("shard-*.npy:1:ENOSPC", "a log-mel cache shard", "ENOSPC", "No checkpoint was written yet"),
    ("index.json:1:EROFS", "the log-mel cache index", "EROFS", "No checkpoint was written yet"),
    ("config.json:1:EDQUOT", "the run's settings", "EDQUOT", "No checkpoint was written yet"),
    ("events.out.tfevents.*:2:EACCES", "the TensorBoard log", "EACCES", "No checkpoint was written yet"),
    ("checkpoint-*.npz:2:ENOSPC", "the checkpoint", "ENOSPC", "checkpoint-000000001.npz' (step 1) is intact"),
    ("history.json:2:ENOSPC", "the training history", "ENOSPC", "checkpoint-000000003.npz' (step 3) is intact"),
    ("history.csv:1:ENOSPC", "the training history", "ENOSPC", "checkpoint-000000004.npz' (step 4) is intact"),
    ("encoder.keras:1:ENOSPC", "the encoder", "ENOSPC", "checkpoint-000000004.npz' (step 4) is intact"),
]
_FIX = {
    "ENOSPC": "free some space on the disk of",
    "EDQUOT": "free some space or raise your disk quota",
    "EROFS": "make '{folder}' writable",
    "EACCES": "make '{folder}' writable",
}


@pytest.mark.large
def test_every_failed_write_is_one_line_naming_the_file_and_the_run_resumes(tmp_path):
    """Through the command line, on this backend: each failed write (full disk,
    read-only folder, quota) ends the run with exit code 2 and one line naming
    the file, what it holds, its size, the error, the intact checkpoint and how
    to go on; no temporary file is left; the same command then carries on. The
    corpus holds a float WAV of 1e30 samples: skipped, named, the run unharmed."""
    import keras
    import numpy as np
    import soundfile as sf

    from byola_keras import _files
    from byola_keras.data import make_default_corpus

    audio = make_default_corpus(str(tmp_path / "audio"), num_clips=8, seed=1)
    loud = os.path.join(audio, "loud.wav")
    sign = np.sign(np.random.default_rng(0).uniform(-1, 1, 16000))
    sf.write(loud, (1e30 * sign).astype(np.float32), 16000, subtype="FLOAT")
    out = tmp_path / "run"
    argv = [
        "pretrain", audio, "--out", str(out), "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "4",
        "--dim", "16", "--memory-size", "8", "--checkpoint-every", "1", "--tensorboard-every", "1",
        "--workers", "1", "--verbose", "0", "--backend", keras.backend.backend(),
    ]
    cases = [spec for spec, *_ in WRITE_FAULTS] + [None]
    script = (
        "import contextlib, io, json, os, sys\n"
        "from byola_keras import cli\n"
        "results = []\n"
        "for spec in json.loads(sys.argv[1]):\n"
        f"    os.environ.pop({_files.WRITE_FAIL_ENV!r}, None)\n"
        "    if spec:\n"
        f"        os.environ[{_files.WRITE_FAIL_ENV!r}] = spec\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        code = cli.main(json.loads(sys.argv[2]))\n"
        "    temporaries = [os.path.join(p, n) for p, _, names in os.walk(sys.argv[3]) for n in names if '.tmp-' in n]\n"
        "    results.append([code, out.getvalue(), temporaries])\n"
        "print(json.dumps(results))\n"
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases), json.dumps(argv), str(out)],
        capture_output=True, text=True, timeout=1800, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for (spec, what, errno_name, checkpoint), (code, printed, temporaries) in zip(WRITE_FAULTS, results):
        errors = [line for line in printed.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1, (spec, printed)
        line = errors[0]
        match = re.search(rf"Could not write {re.escape(what)} '([^']+)' \((\d+(\.\d)? (bytes|kB|MB)[^)]*)\)", line)
        assert match, (spec, line)
        path = match.group(1)
        assert fnmatch.fnmatch(os.path.basename(path), spec.split(":")[0]), (spec, line)
        assert path.startswith(str(out)), (spec, line)
        assert f"({errno_name})" in line and checkpoint in line, (spec, line)
        assert _FIX[errno_name].format(folder=os.path.dirname(path)) in line, (spec, line)
        assert "run the same command again" in line, (spec, line)
        assert temporaries == [], (spec, temporaries)
    # The overflowing clip is skipped and named once the cache is built (3rd run).
    assert re.search(r"skipped 1 \(see .*loud\.wav': its log-mel is not finite", results[2][1]), results[2][1]
    code, printed, temporaries = results[-1]
    assert code == 0 and "Encoder:" in printed and temporaries == [], printed
    assert "Resuming from" in printed and (out / "encoder.keras").is_file()
