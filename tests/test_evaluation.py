"""Linear evaluation: task manifests, embedding cache, the probes, `evaluate` and the CLI."""

import csv
import json
import os
import sys

import keras
import numpy as np
import pytest
import soundfile as sf

from byola_keras import evaluation, frontend
from byola_keras.evaluation import tasks as tasks_lib
from byola_keras.models import AudioNTT2020, WaveformEncoder

SR = frontend.SAMPLE_RATE
FREQS = {"low": 300.0, "mid": 1200.0, "high": 4000.0}


def write_task(
    folder,
    name="tones",
    counts=(10, 3, 3),
    seconds=0.3,
    test_gain=1.0,
    lengths=None,
    seed=0,
):
    """A tone-classification task: one sine frequency per class, jittered, in noise.

    `counts` are clips per class in train, valid, test (valid 0: no valid split).
    `lengths` (seconds) cycles over clips to give different durations.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "clips"), exist_ok=True)
    rows = []
    i = 0
    for split, count in zip(("train", "valid", "test"), counts):
        for label, freq in FREQS.items():
            for _ in range(count):
                dur = seconds if lengths is None else lengths[i % len(lengths)]
                t = np.arange(int(SR * dur)) / SR
                f = freq * (1.0 + 0.03 * rng.standard_normal())
                wave = 0.3 * np.sin(2 * np.pi * f * t) + 0.01 * rng.standard_normal(t.size)
                if split == "test":
                    wave = wave * test_gain
                rel = f"clips/{name}_{i:04d}.wav"
                sf.write(os.path.join(folder, rel), wave.astype("float32"), SR)
                rows.append((rel, label, split))
                i += 1
    path = os.path.join(folder, f"manifest_{name}.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return path


def blobs(n, dims=128, classes=3, spread=0.5, seed=0):
    """Gaussian clusters around fixed, well separated centres."""
    centres = np.random.default_rng(123).standard_normal((classes, dims)) * 2.0
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = centres[y] + spread * rng.standard_normal((n, dims))
    return x.astype("float32"), y.astype("int32")


def peak_then_fall(n, valid, seed, dims=64, strength=6.0):
    """Validation accuracy rises, then falls as training goes on.

    Feature group A (dims) carries the label everywhere. Group B agrees with
    the label on 80 % of train but opposes it, more strongly, on the 20 %
    "hard" train clips where A is silent. Early on both weights grow along the
    label; once the easy clips are fitted only the hard ones pull, B's weight
    turns negative, and on valid (where B agrees with the label, strongly)
    accuracy collapses.
    """
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype("int32")
    s = (2.0 * y - 1.0)[:, None]

    def noise():
        return 1.0 + 0.3 * rng.standard_normal((n, dims))

    if valid:
        a, b = s * noise(), strength * s * noise()
    else:
        hard = ((np.arange(n) % 10) < 2)[:, None]
        a = np.where(hard, 0.0, s) * noise()
        b = np.where(hard, -s, 0.5 * s) * noise()
    return np.concatenate([a, b], axis=1).astype("float32"), y


def small_encoder(seed=0):
    """AudioNTT2020(d=16) with weights drawn from NumPy (`keras.utils.set_random_seed`
    would import TensorFlow under every backend)."""
    encoder = AudioNTT2020(d=16)
    rng = np.random.default_rng(seed)
    values = []
    for variable in encoder.weights:
        shape = tuple(variable.shape)
        if variable.path.endswith(("moving_variance", "gamma")):
            values.append(rng.uniform(0.5, 1.5, shape))
        else:
            values.append(rng.normal(0.0, 0.2, shape))
    encoder.set_weights([v.astype("float32") for v in values])
    return encoder


# ---------------------------------------------------------------- tasks


def test_load_task_reads_manifest(tmp_path):
    path = write_task(tmp_path, counts=(2, 1, 1))
    task = evaluation.load_task(path)
    assert task.name == "tones"
    assert task.classes == sorted(FREQS)
    assert len(task) == 12
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in task.paths)
    assert task.indices("train").size == 6 and task.indices("test").size == 3
    assert task.labels.dtype == np.int32 and task.n_classes == 3


def test_bad_manifests_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        evaluation.load_task(tmp_path / "nope.csv")
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, np.zeros(1600, "float32"), SR)
    bad = tmp_path / "bad_split.csv"
    bad.write_text("path,label,split\na.wav,x,train\nb.wav,y,holdout\n")
    with pytest.raises(ValueError, match="bad_split.csv.*holdout"):
        evaluation.load_task(bad)
    no_test = tmp_path / "no_test.csv"
    no_test.write_text("path,label,split\na.wav,x,train\nb.wav,y,train\n")
    with pytest.raises(ValueError, match="no_test.csv.*'test'"):
        evaluation.load_task(no_test)
    no_col = tmp_path / "no_col.csv"
    no_col.write_text("path,label\na.wav,x\n")
    with pytest.raises(ValueError, match="no_col.csv"):
        evaluation.load_task(no_col)
    one_class = tmp_path / "one_class.csv"
    one_class.write_text("path,label,split\na.wav,x,train\nb.wav,x,test\n")
    with pytest.raises(ValueError, match="one_class.csv.*single label"):
        evaluation.load_task(one_class)
    gone = tmp_path / "gone.csv"
    gone.write_text("path,label,split\na.wav,x,train\nc.wav,y,test\n")
    with pytest.raises(FileNotFoundError, match="c.wav"):
        evaluation.load_task(gone)


def test_no_valid_split_holds_out_ten_percent_of_train(tmp_path):
    path = write_task(tmp_path, counts=(20, 0, 2))
    task = evaluation.load_task(path)
    index, carved = evaluation.task_split_indices(task, seed=0)
    assert carved
    train_rows = task.indices("train")
    assert index["valid"].size == 6  # 10 % of 60
    assert index["train"].size == 54
    assert sorted(np.concatenate([index["train"], index["valid"]])) == sorted(train_rows)
    # stratified: 2 of each class's 20
    assert np.bincount(task.labels[index["valid"]]).tolist() == [2, 2, 2]
    again, _ = evaluation.task_split_indices(task, seed=0)
    other, _ = evaluation.task_split_indices(task, seed=1)
    np.testing.assert_array_equal(again["valid"], index["valid"])
    assert not np.array_equal(other["valid"], index["valid"])
    # uneven classes: the total stays round(10 %)
    labels = np.array([0] * 7 + [1] * 13 + [2] * 3)
    keep, held = evaluation.split_valid(labels, seed=0)
    assert held.size == 2 and keep.size == 21 and not set(keep) & set(held)


# ---------------------------------------------------------------- embedding


def test_norm_stats_come_from_the_train_split_only(tmp_path):
    quiet = write_task(tmp_path / "a", counts=(2, 1, 2))
    loud = write_task(tmp_path / "b", counts=(2, 1, 2), test_gain=20.0)
    encoder = evaluation.log_mel_mean_std_encoder()
    e1 = evaluation.embed_task(encoder, quiet, cache_dir=False)
    e2 = evaluation.embed_task(encoder, loud, cache_dir=False)
    assert e1.stats_source == "train split"
    assert e1.mean == pytest.approx(e2.mean, abs=1e-6)
    assert e1.std == pytest.approx(e2.std, abs=1e-6)
    task = evaluation.load_task(quiet)
    mels = evaluation.task_log_mels(task)
    expected = np.concatenate([mels[i].ravel() for i in task.indices("train")])
    assert e1.mean == pytest.approx(float(expected.mean()), rel=1e-5)
    assert e1.std == pytest.approx(float(expected.std()), rel=1e-5)
    loud_mels = evaluation.task_log_mels(evaluation.load_task(loud))
    everything = np.concatenate([m.ravel() for m in loud_mels])
    assert abs(float(everything.mean()) - e2.mean) > 0.5


def test_lengths_are_grouped_without_changing_embeddings(tmp_path):
    path = write_task(tmp_path, counts=(2, 1, 1), lengths=(0.3, 0.5, 0.3))
    encoder = small_encoder()
    task = evaluation.load_task(path)
    emb = evaluation.embed_task(encoder, task, mean=-6.0, std=4.0, batch_size=4, cache_dir=False)
    mels = evaluation.task_log_mels(task)
    assert len({m.shape[-1] for m in mels}) == 2
    for i in (1, 3):
        x = ((mels[i] + 6.0) / 4.0)[None, ..., None]
        one = keras.ops.convert_to_numpy(encoder(x, training=False))[0]
        np.testing.assert_allclose(emb.embeddings[i], one, rtol=1e-4, atol=1e-5)


def test_duration_crops_and_pads(tmp_path):
    path = write_task(tmp_path, counts=(1, 1, 1), lengths=(0.2, 0.5))
    task = evaluation.load_task(path)
    mels = evaluation.task_log_mels(task, duration=0.3)
    assert {m.shape for m in mels} == {(frontend.N_MELS, frontend.num_frames(4800))}
    whole = evaluation.task_log_mels(task)
    np.testing.assert_allclose(mels[1][:, :20], whole[1][:, :20], atol=1e-5)  # cropped from the start
    mean_mels = evaluation.task_log_mels(task, duration="mean")
    assert len({m.shape for m in mean_mels}) == 1
    bucketed = evaluation.task_log_mels(task, bucket_frames=16)
    assert all(m.shape[-1] % 16 == 0 for m in bucketed)


def test_embedding_cache_is_hit_then_invalidated(tmp_path, monkeypatch):
    path = write_task(tmp_path / "task", counts=(2, 1, 1))
    cache = tmp_path / "cache"
    encoder = small_encoder()
    first = evaluation.embed_task(encoder, path, cache_dir=cache)
    assert not first.cached and os.path.isfile(first.cache_path)
    assert first.cache_path.endswith(".npz")

    def no_decoding(*args, **kwargs):
        raise AssertionError("audio decoded although the embeddings are cached")

    monkeypatch.setattr(tasks_lib, "load_audio", no_decoding)
    second = evaluation.embed_task(encoder, path, cache_dir=cache)
    assert second.cached and second.cache_path == first.cache_path
    np.testing.assert_array_equal(second.embeddings, first.embeddings)
    assert (second.mean, second.std) == (first.mean, first.std)
    # same architecture and weights in a new object: still a hit
    clone = small_encoder()
    clone.set_weights(encoder.get_weights())
    assert evaluation.embed_task(clone, path, cache_dir=cache).cached
    monkeypatch.undo()

    weights = encoder.get_weights()
    weights[0] = weights[0] + 0.1
    encoder.set_weights(weights)
    changed = evaluation.embed_task(encoder, path, cache_dir=cache)
    assert not changed.cached and changed.cache_path != first.cache_path
    assert not np.allclose(changed.embeddings, first.embeddings)
    # other settings are part of the key too
    assert not evaluation.embed_task(encoder, path, cache_dir=cache, duration=0.25).cached
    assert not evaluation.embed_task(encoder, path, mean=-5.0, std=3.0, cache_dir=cache).cached
    assert len(os.listdir(cache)) == 4


# ---------------------------------------------------------------- probes


def test_standardize_uses_train_statistics_only():
    rng = np.random.default_rng(0)
    train = rng.normal(3.0, 2.0, (50, 4))
    test = rng.normal(3.0, 2.0, (20, 4))
    tr, te = evaluation.standardize(train, test)
    np.testing.assert_allclose(tr.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(tr.std(0), 1.0, atol=1e-5)
    tr2, te2 = evaluation.standardize(train, test + 100.0)
    np.testing.assert_array_equal(tr2, tr)
    np.testing.assert_allclose(te2 - te, np.broadcast_to(100.0 / train.std(0), te.shape), rtol=1e-5)
    assert np.all(te2.mean(0) > 10)  # not re-centred on its own statistics


def test_shifting_the_test_split_does_not_touch_training():
    train, valid, test = blobs(300, seed=1), blobs(30, seed=2), blobs(30, seed=3)
    base = evaluation.linear_probe(train, valid, test, runs=1, seed=0)
    shifted = evaluation.linear_probe(train, valid, (test[0] + 25.0, test[1]), runs=1, seed=0)
    assert shifted["valid_accuracies"] == base["valid_accuracies"]
    assert shifted["epochs"] == base["epochs"]
    assert base["mean"] == 1.0
    assert shifted["mean"] < 0.9  # a shift the train statistics do not remove


def test_separable_toy_task_reaches_full_test_accuracy():
    train, valid, test = blobs(1000, seed=1), blobs(150, seed=2), blobs(60, seed=3)
    result = evaluation.linear_probe(train, valid, test, runs=2, seed=0)
    assert result["accuracies"] == [1.0, 1.0]
    assert result["mean"] == 1.0 and result["std"] == 0.0
    assert all(e <= 200 for e in result["epochs"])
    logreg = evaluation.logreg_probe(train, valid, test)
    assert logreg["mean"] == 1.0 and logreg["C"] in evaluation.DEFAULT_C_GRID


def test_logreg_without_scikit_learn_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    with pytest.raises(ImportError, match="scikit-learn"):
        evaluation.logreg_probe(blobs(30), blobs(9), blobs(9))


def test_early_stopping_restores_the_best_epoch():
    train = peak_then_fall(400, False, 1)
    valid = peak_then_fall(100, True, 2)
    test = peak_then_fall(100, True, 3)
    result = evaluation.linear_probe(train, valid, test, runs=2, seed=0, return_history=True)
    for r, history in enumerate(result["histories"]):
        best = int(np.argmax(history))
        assert max(history) - history[-1] > 0.2, history  # it did peak, then fall
        assert result["best_epochs"][r] == best + 1
        assert result["epochs"][r] == best + 1 + 10  # patience 10
        assert result["valid_accuracies"][r] == pytest.approx(max(history), abs=1e-6)
        # the test split follows valid's distribution: the best epoch's weights score
        # like the best epoch, far above the last epoch's weights
        assert result["accuracies"][r] > history[-1] + 0.2


def test_same_seed_repeats_exactly():
    train, valid, test = (blobs(n, spread=3.0, seed=k) for k, n in ((1, 90), (2, 30), (3, 30)))
    a = evaluation.linear_probe(train, valid, test, runs=2, seed=5, epochs=10, return_history=True)
    b = evaluation.linear_probe(train, valid, test, runs=2, seed=5, epochs=10, return_history=True)
    assert a["accuracies"] == b["accuracies"]
    assert a["histories"] == b["histories"]
    # runs are independent: run 1 of seed 5 is run 0 of seed 6 (no state carried over)
    c = evaluation.linear_probe(train, valid, test, runs=1, seed=6, epochs=10, return_history=True)
    assert c["histories"][0] == a["histories"][1]
    assert a["histories"][0] != a["histories"][1]


# ---------------------------------------------------------------- evaluate, CLI


def test_evaluate_end_to_end(tmp_path):
    path = write_task(tmp_path / "task", counts=(20, 4, 4))
    no_valid = write_task(tmp_path / "task2", name="tones2", counts=(20, 0, 4), seed=1)
    encoder = evaluation.log_mel_mean_std_encoder()
    kwargs = dict(runs=1, probe="both", cache_dir=tmp_path / "cache", learning_rate=1e-2, epochs=20)
    results = evaluation.evaluate(encoder, [path, no_valid], **kwargs)
    tones = results["tasks"]["tones"]
    assert min(tones["linear"]["accuracies"]) > 0.8  # chance 0.33
    assert tones["logreg"]["mean"] == 1.0
    assert (tones["n_train"], tones["n_valid"], tones["n_test"], tones["n_classes"]) == (60, 12, 12, 3)
    assert tones["embedding_dim"] == 2 * frontend.N_MELS and not tones["cached"]
    second = results["tasks"]["tones2"]
    assert second["valid_from_train"] and second["n_valid"] == 6 and second["n_train"] == 54
    assert results["average"]["linear"] == pytest.approx(
        (tones["linear"]["mean"] + second["linear"]["mean"]) / 2
    )
    again = evaluation.evaluate(encoder, [path, no_valid], **kwargs)
    assert again["tasks"]["tones"]["cached"]
    for name in ("tones", "tones2"):
        for probe in ("linear", "logreg"):
            assert again["tasks"][name][probe]["accuracies"] == results["tasks"][name][probe]["accuracies"]
    table = evaluation.format_table(results)
    assert "tones2" in table and "average" in table and "100.0" in table
    json.dumps(results)  # serialisable as is
    with pytest.raises(ValueError, match="probe"):
        evaluation.evaluate(encoder, path, probe="svm")


def test_cli_evaluate_with_keras_encoder(tmp_path, capsys):
    from byola_keras import cli

    path = write_task(tmp_path / "task", counts=(4, 2, 2))
    folder = tmp_path / "run"
    folder.mkdir()
    WaveformEncoder(small_encoder(), -7.5, 4.25).save(folder / "encoder.keras")
    out = tmp_path / "out" / "results.json"
    code = cli.main(
        [
            "evaluate",
            str(folder / "encoder.keras"),
            path,
            "--runs",
            "1",
            "--epochs",
            "5",
            "--json",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "tones" in printed and "average" in printed
    results = json.loads(out.read_text())
    entry = results["tasks"]["tones"]
    assert (entry["mean"], entry["std"], entry["stats_source"]) == (-7.5, 4.25, "given")
    assert entry["embedding_dim"] == 16 and len(entry["linear"]["accuracies"]) == 1
    assert entry["linear"]["epochs"][0] <= 5
    # --stats overrides the model's; a pretrain output folder is accepted as ENCODER
    cli.main(["evaluate", str(folder), path, "--runs", "1", "--epochs", "2", "--stats", "-6", "3",
              "--no-cache", "--json", str(out), "--quiet"])
    assert json.loads(out.read_text())["tasks"]["tones"]["mean"] == -6.0
    cli.main(["evaluate", str(folder), path, "--runs", "1", "--epochs", "2", "--train-stats",
              "--no-cache", "--json", str(out), "--quiet"])
    assert json.loads(out.read_text())["tasks"]["tones"]["stats_source"] == "train split"


def test_cli_evaluate_official_weights_use_train_split_stats(shared, tmp_path):
    from byola_keras import cli

    weights = shared / "reference" / "weights" / "AudioNTT2020-BYOLA-64x96d512.pth"
    path = write_task(tmp_path / "task", counts=(3, 1, 1))
    out = tmp_path / "official.json"
    code = cli.main(["evaluate", str(weights), path, "--runs", "1", "--epochs", "2", "--probe", "logreg",
                     "--no-cache", "--json", str(out), "--quiet"])
    assert code == 0
    entry = json.loads(out.read_text())["tasks"]["tones"]
    assert entry["embedding_dim"] == 512 and entry["stats_source"] == "train split"
    task = evaluation.load_task(path)
    mels = evaluation.task_log_mels(task)
    mean, std = evaluation.log_mel_stats([mels[i] for i in task.indices("train")])
    assert entry["mean"] == pytest.approx(mean) and entry["std"] == pytest.approx(std)


@pytest.mark.parametrize("htk", [False, True], ids=["slaney", "htk"])
def test_cached_host_path_equals_the_model(tmp_path, htk):
    """The evaluation's host log-mels + encoder give what `WaveformEncoder.embed` gives."""
    path = write_task(tmp_path, counts=(2, 1, 1), lengths=(0.3, 0.52, 0.05))
    task = evaluation.load_task(path)
    model = WaveformEncoder(small_encoder(), -6.0, 4.0, htk=htk)
    emb = evaluation.embed_task(model, task, batch_size=4, cache_dir=False)
    assert (emb.mean, emb.std, emb.stats_source) == (-6.0, 4.0, "given")
    want = model.embed([tasks_lib.load_audio(p) for p in task.paths]).clip
    scale = max(1.0, float(np.abs(want).max()))
    assert np.max(np.abs(emb.embeddings - want)) <= 1e-4 * scale


def test_bad_encoder_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.keras"):
        evaluation.load_encoder(tmp_path)
    other = tmp_path / "model.onnx"
    other.write_text("x")
    with pytest.raises(ValueError, match="model.onnx"):
        evaluation.load_encoder(other)
    small_encoder().save(tmp_path / "bare.keras")
    with pytest.raises(ValueError, match="not a WaveformEncoder"):
        evaluation.load_encoder(tmp_path / "bare.keras")
