"""`byola-keras embed`: a folder or manifest of real audio files -> Parquet embeddings.

Each clip's embeddings equal `WaveformEncoder.embed` on that file alone; broken
files are skipped and listed; a run killed with SIGKILL resumes without
redoing committed files; changed files are re-embedded once; two shards give
one run's rows; bad arguments are one line with exit code 2.
"""

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from byola_keras import cli
from byola_keras.corpus import inputs
from byola_keras.corpus.progress import Progress
from byola_keras.models import AudioNTT2020, AudioNTT2022, WaveformEncoder
from byola_keras.models.length_masked import length_masked_encoder, masks_padding
from tests.test_data_robustness import empty_file, text_file, truncated_wav

MEAN, STD = -5.49, 5.04
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (name, seconds, sample rate, channels): lengths in several buckets, one shorter
# than the model's minimum (1,120 samples), rates other than 16 kHz, stereo.
GOOD = [
    ("a/short.wav", 0.04, 16000, 1),
    ("a/one.flac", 1.0, 16000, 1),
    ("a/stereo.wav", 1.3, 44100, 2),
    ("b/low.wav", 2.2, 8000, 1),
    ("b/mid.flac", 0.7, 22050, 2),
    ("b/c/long.wav", 2.6, 16000, 1),
    ("b/c/same_as_one.wav", 1.0, 16000, 1),
]
# name -> what failed.csv's reason says
BROKEN = {
    "bad/truncated.wav": "truncated",
    "bad/text.wav": "not recognised",
    "bad/empty.wav": "empty",
    "bad/nan.wav": "NaN/inf sample",
    "bad/huge.wav": "log-mel is not finite",
}


def _write_corpus(root):
    rng = np.random.default_rng(0)
    for i, (name, seconds, rate, channels) in enumerate(GOOD):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        t = np.arange(int(seconds * rate)) / rate
        tone = 0.3 * np.sin(2 * np.pi * (150 + 90 * i) * t)[:, None]
        sf.write(path, (tone + 0.05 * rng.standard_normal((t.shape[0], channels))).astype("float32"), rate)
    (root / "bad").mkdir()
    truncated_wav(str(root / "bad/truncated.wav"))
    text_file(str(root / "bad/text.wav"))
    empty_file(str(root / "bad/empty.wav"))
    nan = rng.uniform(-0.3, 0.3, 8000).astype("float32")
    nan[[5, 900]] = np.nan
    sf.write(root / "bad/nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(root / "bad/huge.wav", np.full(8000, 1e30, "float32"), 16000, subtype="FLOAT")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("encoder") / "encoder.keras"
    WaveformEncoder(AudioNTT2020(d=32), MEAN, STD).save(path)
    return str(path)


def embed(*argv):
    return cli.main(["embed", *map(str, argv), "--quiet"])


def clips_table(out):
    table = pq.read_table(os.path.join(out, "clips")).to_pydict()
    order = np.argsort(table["path"])
    return {k: [v[i] for i in order] for k, v in table.items()}


def part_files(out):
    found = {}
    for sub in ("clips", "frames"):
        folder = os.path.join(out, sub)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            found[f"{sub}/{name}"] = os.stat(os.path.join(folder, name)).st_mtime_ns
    return found


def failed_rows(path):
    with open(path, newline="") as f:
        return {row["path"]: row["reason"] for row in csv.DictReader(f)}


def test_length_masked_encoder_equals_each_clip_alone():
    """Zero-padded rows of different lengths give what each clip gives alone (v1, v2)."""
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    for encoder in (AudioNTT2020(d=32), AudioNTT2022(d=1024 + 16)):
        assert masks_padding(encoder)
        model = length_masked_encoder(encoder)
        lengths = [57, 101, 8]
        clips = [rng.standard_normal((64, n, 1)).astype("float32") for n in lengths]
        batch = np.zeros((len(clips), 64, 128, 1), "float32")
        batch[:, :, 110:] = 50.0  # padding that is not zero is ignored too
        for i, clip in enumerate(clips):
            batch[i, :, : clip.shape[1]] = clip
        out = model.predict_on_batch([batch, np.array(lengths, "int32")])
        for i, clip in enumerate(clips):
            alone_clip = keras.ops.convert_to_numpy(encoder(clip[None]))[0]
            alone_frames = keras.ops.convert_to_numpy(encoder.frame_encoder(clip[None]))[0]
            np.testing.assert_allclose(out["embedding"][i], alone_clip, rtol=1e-5, atol=1e-5)
            count = alone_frames.shape[0]
            np.testing.assert_allclose(out["frame_embeddings"][i, :count], alone_frames, rtol=1e-5, atol=1e-5)
    assert not masks_padding(keras.Sequential([keras.layers.Dense(2)]))


def test_folder_with_broken_files_embeds_each_good_file_as_embed_alone(
    corpus, encoder_file, tmp_path, capsys, monkeypatch
):
    from byola_keras.corpus import batches, run

    # Files over 1.6 s (low.wav, long.wav) take the long-clip path, in windows of 160 frames;
    # beyond 150 waiting frames the fullest bucket runs: every path of the batching is taken.
    monkeypatch.setattr(batches, "LONG_CLIP_FRAMES", 160)
    monkeypatch.setattr(run, "WAITING_FRAMES", 150)
    out = tmp_path / "out"
    assert embed(encoder_file, corpus, "--out", out, "--frames", "--batch-size", 2, "--part-size", 3) == 0
    line = capsys.readouterr().out.strip()
    assert f"{len(GOOD)} file(s) embedded, 0 already" in line and f"{len(BROKEN)} failed" in line
    table = clips_table(out)
    assert table["path"] == sorted(name for name, *_ in GOOD)
    assert failed_rows(out / "failed.csv").keys() == BROKEN.keys()
    for name, reason in failed_rows(out / "failed.csv").items():
        assert BROKEN[name] in reason, (name, reason)
    model = keras.saving.load_model(encoder_file)
    frames = pq.read_table(out / "frames").to_pydict()
    info = json.loads((out / "embed.json").read_text())
    assert info["embedding_dim"] == 32 and info["frames"] is True
    for name, embedding, duration in zip(table["path"], table["embedding"], table["duration_s"]):
        wave, rate = sf.read(corpus / name, dtype="float32", always_2d=True)
        alone = model.embed([wave], sample_rate=rate)
        assert duration == pytest.approx(wave.shape[0] / rate)
        np.testing.assert_allclose(embedding, alone.clip[0], rtol=1e-4, atol=1e-5)
        rows = [i for i, p in enumerate(frames["path"]) if p == name]
        assert [frames["frame"][i] for i in rows] == list(range(len(alone.timestamps[0])))
        np.testing.assert_allclose([frames["time_s"][i] for i in rows], alone.timestamps[0], atol=1e-6)
        np.testing.assert_allclose(
            [frames["embedding"][i] for i in rows], alone.frames[0], rtol=1e-4, atol=1e-5
        )
    # A rerun finds everything done: no part is rewritten; the broken files are tried again.
    before = part_files(out)
    assert embed(encoder_file, corpus, "--out", out, "--frames") == 0
    assert f"0 file(s) embedded, {len(GOOD)} already" in capsys.readouterr().out
    assert part_files(out) == before


def _manifest(path, corpus, names):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split", "speaker"])
        for i, name in enumerate(names):
            rel = os.path.relpath(corpus / name, path.parent)
            writer.writerow([rel, f"class{i % 3}", ("train", "valid", "test")[i % 3], f"spk{i}"])
    return path


def test_manifest_columns_and_two_shards_read_as_one_run(corpus, encoder_file, tmp_path, capsys):
    names = [name for name, *_ in GOOD] + ["bad/nan.wav", "bad/missing.wav"]
    (tmp_path / "tasks").mkdir()
    manifest = _manifest(tmp_path / "tasks" / "manifest.csv", corpus, names)
    one, two = tmp_path / "one", tmp_path / "two"
    assert embed(encoder_file, manifest, "--out", one, "--batch-size", 4) == 0
    for shard in ("0/2", "1/2"):
        workers = "0" if shard == "0/2" else "1"  # 0: decoded in the main thread
        assert embed(encoder_file, manifest, "--out", two, "--shard", shard, "--batch-size", 2, "--workers", workers) == 0
    capsys.readouterr()
    whole, sharded = clips_table(one), clips_table(two)
    assert set(whole) == {"path", "label", "split", "speaker", "duration_s", "file_size", "file_mtime_ns", "embedding"}
    # The manifest's path text, label, split and other columns, for each good file.
    with open(manifest, newline="") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    good = sorted(p for p in rows if "bad/" not in p)
    assert whole["path"] == good
    assert whole["label"] == [rows[p]["label"] for p in good]
    assert whole["speaker"] == [rows[p]["speaker"] for p in good]
    for key in ("path", "label", "split", "speaker", "duration_s", "file_size", "file_mtime_ns"):
        assert sharded[key] == whole[key], key
    np.testing.assert_allclose(sharded["embedding"], whole["embedding"], rtol=1e-5, atol=1e-6)
    # Each shard wrote its own parts, holding only the files that hash to it.
    for name in os.listdir(two / "clips"):
        shard = 0 if name.startswith("part-s0of2-") else 1 if name.startswith("part-s1of2-") else None
        assert shard is not None, name
        paths = pq.read_table(two / "clips" / name).column("path").to_pylist()
        assert {inputs.shard_of(p, 2) for p in paths} == {shard}
    failed = {}
    for name in ("failed-s0of2.csv", "failed-s1of2.csv"):
        if (two / name).exists():
            failed.update(failed_rows(two / name))
    assert failed.keys() == failed_rows(one / "failed.csv").keys() == {n for n in rows if "bad/" in n}
    assert "does not exist" in failed[os.path.relpath(corpus / "bad/missing.wav", manifest.parent)]
    # Each file belongs to exactly one shard, whatever else is listed.
    assert all(sum(inputs.shard_of(p, 3) == i for i in range(3)) == 1 for p in rows)


@pytest.mark.large
def test_sigkill_mid_commit_then_rerun_embeds_each_file_exactly_once(corpus, encoder_file, tmp_path, capsys):
    out = tmp_path / "out"
    env = {**os.environ, "BYOLA_TEST_KILL_AT": "embed-part:2:frames", "PYTHONPATH": REPO}
    argv = [encoder_file, corpus, "--out", out, "--frames", "--batch-size", 2, "--part-size", 2, "--workers", 1]
    done = subprocess.run(
        [sys.executable, "-m", "byola_keras.cli", "embed", *map(str, argv), "--quiet"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == -9, done.stderr[-2000:]
    killed = part_files(out)
    # Part 1 committed (clips and frames); part 2's frames written, its clips not.
    assert sorted(killed) == ["clips/part-00000.parquet", "frames/part-00000.parquet", "frames/part-00001.parquet"]
    committed = pq.read_table(out / "clips").column("path").to_pylist()
    assert len(committed) == 2
    assert embed(*argv) == 0
    line = capsys.readouterr().out
    assert f"{len(GOOD) - 2} file(s) embedded, 2 already" in line
    after = part_files(out)
    assert after["clips/part-00000.parquet"] == killed["clips/part-00000.parquet"]  # not rewritten
    assert after["frames/part-00000.parquet"] == killed["frames/part-00000.parquet"]
    assert "frames/part-00001.parquet" not in after or after["frames/part-00001.parquet"] != killed["frames/part-00001.parquet"]
    paths = pq.read_table(out / "clips").column("path").to_pylist()
    assert sorted(paths) == sorted(name for name, *_ in GOOD)  # each good file once
    frames = pq.read_table(out / "frames").to_pydict()
    pairs = list(zip(frames["path"], frames["frame"]))
    assert len(pairs) == len(set(pairs)) and set(frames["path"]) == set(paths)
    assert not [n for n in os.listdir(out / "clips") + os.listdir(out / "frames") if n.startswith(".")]


def test_changed_and_removed_files_other_encoder_and_restart(encoder_file, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        sf.write(corpus / f"clip{i}.wav", rng.uniform(-0.3, 0.3, 8000 + 1000 * i).astype("float32"), 16000)
    out = tmp_path / "out"
    assert embed(encoder_file, corpus, "--out", out) == 0
    old = dict(zip(*[clips_table(out)[k] for k in ("path", "embedding")]))
    sf.write(corpus / "clip1.wav", rng.uniform(-0.3, 0.3, 12000).astype("float32"), 16000)
    os.remove(corpus / "clip2.wav")
    capsys.readouterr()
    assert embed(encoder_file, corpus, "--out", out) == 0
    line = capsys.readouterr().out
    assert "1 file(s) embedded, 2 already" in line and "2 old row(s)" in line
    new = clips_table(out)
    assert new["path"] == ["clip0.wav", "clip1.wav", "clip3.wav"]
    assert not np.allclose(new["embedding"][1], old["clip1.wav"])
    np.testing.assert_array_equal(new["embedding"][0], old["clip0.wav"])

    # Another encoder is refused with one line, before anything is written.
    keras.utils.set_random_seed(5)
    other = tmp_path / "other.keras"
    WaveformEncoder(AudioNTT2020(d=32), MEAN, STD).save(other)
    before = part_files(out)
    assert embed(other, corpus, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encoder (weights and front-end)" in err[0] and "--restart" in err[0]
    assert part_files(out) == before
    assert embed(other, corpus, "--out", out, "--frames", "--restart") == 0
    assert "3 file(s) embedded, 0 already" in capsys.readouterr().out
    assert json.loads((out / "embed.json").read_text())["encoder_file"] == str(other)

    # Refused after the backend started: not a WaveformEncoder; a folder without audio.
    AudioNTT2020(d=32).save(tmp_path / "bare.keras")
    (tmp_path / "silent").mkdir()
    for argv, expected in [
        ((tmp_path / "bare.keras", corpus), "not a WaveformEncoder"),
        ((encoder_file, tmp_path / "silent"), "No audio file found"),
    ]:
        assert embed(*argv, "--out", tmp_path / "refused") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err


BAD_EMBED_ARGUMENTS = [
    ([], "the following arguments are required: --out"),
    (["--out", "{out}", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["--out", "{out}", "--workers", "-1"], "argument --workers: must be >= 0"),
    (["--out", "{out}", "--part-size", "0"], "argument --part-size: must be >= 1"),
    (["--out", "{out}", "--shard", "2/2"], "argument --shard: expected I/N with 0 <= I < N"),
    (["--out", "{out}", "--shard", "1"], "argument --shard: expected I/N"),
    (["--out", "{out}", "--shard", "0/2", "--restart"], "argument --restart: not with --shard"),
    (["--out", "{file}"], "argument --out: '{file}' exists and is not a folder"),
]
BAD_EMBED_INPUTS = [  # (ENCODER, INPUT, message)
    ("{missing}", "{folder}", "argument ENCODER: '{missing}' does not exist"),
    ("{folder}", "{folder}", "argument ENCODER: '{folder}' is not a file"),
    ("{pth}", "{folder}", "is not a .keras file (convert an official .pth first"),
    ("{encoder}", "{missing}", "argument INPUT: '{missing}' does not exist"),
    ("{encoder}", "{no_path}", "has no 'path' column"),
    ("{encoder}", "{reserved}", "has column(s) embedding, which the output uses"),
    ("{encoder}", "{repeated}", "line 3: path 'x.wav' repeats line 2"),
    ("{encoder}", "{ragged}", "line 2: 2 fields, the header has 3"),
]


def test_bad_embed_arguments_are_one_line_before_a_backend(tmp_path):
    names = {
        "missing": tmp_path / "missing", "folder": tmp_path / "folder", "file": tmp_path / "a_file",
        "pth": tmp_path / "w.pth", "encoder": tmp_path / "e.keras", "no_path": tmp_path / "no_path.csv",
        "reserved": tmp_path / "reserved.csv", "repeated": tmp_path / "repeated.csv",
        "ragged": tmp_path / "ragged.csv", "out": tmp_path / "out",
    }
    names["folder"].mkdir()
    for key in ("file", "pth", "encoder"):
        names[key].write_text("x")
    names["no_path"].write_text("file,label\nx.wav,a\n")
    names["reserved"].write_text("path,embedding\nx.wav,a\n")
    names["repeated"].write_text("path,label\nx.wav,a\nx.wav,b\n")
    names["ragged"].write_text("path,label,split\nx.wav,a\n")
    fill = {k: str(v) for k, v in names.items()}
    cases = [["embed", fill["encoder"], fill["folder"], *(a.format(**fill) for a in argv)] for argv, _ in BAD_EMBED_ARGUMENTS]
    cases += [["embed", enc.format(**fill), src.format(**fill), "--out", fill["out"]] for enc, src, _ in BAD_EMBED_INPUTS]
    cases.append(["embed", fill["encoder"], fill["folder"], "--out", fill["out"], "NO_PYARROW"])
    expected = [e for _, e in BAD_EMBED_ARGUMENTS] + [e for *_, e in BAD_EMBED_INPUTS]
    expected.append('pyarrow, which is not installed: pip install "byola-keras[embed]"')
    script = (
        "import contextlib, io, json, sys\n"
        "from byola_keras import cli\n"
        "results = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    if argv[-1] == 'NO_PYARROW':\n"
        "        argv = argv[:-1]; sys.modules['pyarrow'] = None\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            code = cli.main(argv)\n"
        "        except SystemExit as exit:\n"
        "            code = exit.code\n"
        "    results.append([code, err.getvalue()])\n"
        "print(json.dumps([results, [m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules]]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["PYTHONPATH"] = REPO
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True, timeout=300, env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    results, loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == []
    for case, want, (code, err) in zip(cases, expected, results):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("byola-keras embed: error"), (case, lines)
        assert want.format(**fill) in lines[0], (case, lines)
    assert not names["out"].exists()


def test_progress_line_counts_rate_eta_and_failures():
    import io

    stream = io.StringIO()
    progress = Progress(4, 400, stream=stream, log_every=0.0)
    progress.advance(1, 100)
    progress.advance(1, 100, failed=1)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("embed [#####") and "1/4 files" in lines[0] and "ETA" in lines[0]
    assert "2/4 files" in lines[-1] and "1 failed" in lines[-1] and "files/s" in lines[-1]
    quiet = io.StringIO()
    silent = Progress(4, 400, stream=quiet, enabled=False)
    silent.advance(4, 400)
    silent.close()
    assert quiet.getvalue() == ""


def test_long_clip_in_windows_equals_the_whole_clip():
    """A clip longer than the window runs window by window with the same results (v1, v2)."""
    from byola_keras.corpus.batches import BatchEncoder

    keras.utils.set_random_seed(2)
    rng = np.random.default_rng(2)
    for encoder in (AudioNTT2020(d=32), AudioNTT2022(d=1024 + 16)):
        model = WaveformEncoder(encoder, MEAN, STD)
        batches = BatchEncoder(model, batch_size=4, window_frames=40)
        log_mel = rng.standard_normal((64, 203)).astype("float32")
        assert batches.is_long(203) and not batches.is_long(40)
        clip, frames = batches.run_long(log_mel)
        alone = keras.ops.convert_to_numpy(encoder.frame_encoder(log_mel[None, :, :, None]))[0]
        assert frames.shape == alone.shape
        np.testing.assert_allclose(frames, alone, rtol=1e-5, atol=1e-5)
        whole = keras.ops.convert_to_numpy(encoder(log_mel[None, :, :, None]))[0]
        np.testing.assert_allclose(clip, whole, rtol=1e-5, atol=1e-5)
