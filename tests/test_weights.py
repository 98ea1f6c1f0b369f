"""Official PyTorch weights -> Keras: safe reading, exact parity, errors, the CLI."""

import os
import pickle
import struct
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

from byola_keras import weights
from byola_keras.models import WaveformEncoder
from tests.conftest import backend

V1 = "AudioNTT2020-BYOLA-64x96d512.pth"
V2 = "SYNTHETIC-AudioNTT2022-64x96-d1280-h256-seed0.pth"


def weight_file(shared, name):
    return str(shared / "reference" / "weights" / name)


def assert_rel_close(actual, expected, rtol=1e-4):
    actual = np.asarray(keras.ops.convert_to_numpy(actual), np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = np.max(np.abs(actual - expected))
    assert err <= rtol * np.max(np.abs(expected)), (err, np.max(np.abs(expected)))


def conv_output(encoder, x):
    """Output of the last conv block's pool, in torch layout (N, C, F, T)."""
    pool = f"pool{encoder.num_blocks}"
    model = keras.Model(encoder.input, encoder.get_layer(pool).output)
    return keras.ops.convert_to_numpy(model(x)).transpose(0, 3, 1, 2)


# A minimal torch.save writer (zip + protocol-2 pickle), so that checkpoints of
# any shape can be built without torch. Tensors are `Strided(storage, offset,
# size, stride)` or plain arrays (contiguous); `Raw(bytes)` inserts pickle opcodes.


class Strided:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class Raw:
    def __init__(self, opcodes):
        self.opcodes = opcodes


_STORAGE_NAMES = {
    "float32": "FloatStorage",
    "float64": "DoubleStorage",
    "float16": "HalfStorage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
    "bfloat16": "BFloat16Storage",
}


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text):
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value):
    return b"J" + struct.pack("<i", value)


def _tuple(items):
    return b"(" + b"".join(items) + b"t"


def write_torch_file(path, obj, byteorder="little", prefix="archive"):
    storages = []

    def emit(value):
        if isinstance(value, Raw):
            return value.opcodes
        if isinstance(value, dict):
            body = b"".join(emit(k) + emit(v) for k, v in value.items())
            return _global("collections", "OrderedDict") + b")R" + (b"(" + body + b"u" if body else b"")
        if isinstance(value, str):
            return _str(value)
        if isinstance(value, bool):
            return b"\x88" if value else b"\x89"
        if isinstance(value, int):
            return _int(value)
        if isinstance(value, (tuple, list)):
            return _tuple([emit(v) for v in value])
        if isinstance(value, np.ndarray):
            value = Strided(value.reshape(-1), 0, value.shape, tuple(
                int(np.prod(value.shape[i + 1 :])) for i in range(value.ndim)))
        if isinstance(value, Strided):
            key = str(len(storages))
            storage = value.storage
            kind = getattr(storage, "torch_dtype", str(storage.dtype))
            storages.append((key, storage))
            pid = _tuple([
                _str("storage"), _global("torch", _STORAGE_NAMES[kind]), _str(key),
                _str("cpu"), _int(int(storage.shape[0])),
            ]) + b"Q"
            args = _tuple([
                pid, _int(value.offset), emit(tuple(value.size)), emit(tuple(value.stride)),
                b"\x89", _global("collections", "OrderedDict") + b")R",
            ])
            return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"
        raise TypeError(type(value))

    data = b"\x80\x02" + emit(obj) + b"."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", data)
        z.writestr(f"{prefix}/byteorder", byteorder)
        for key, storage in storages:
            raw = storage.view(np.uint16) if getattr(storage, "torch_dtype", "") == "bfloat16" else storage
            if byteorder == "big":
                raw = raw.astype(raw.dtype.newbyteorder(">"))
            z.writestr(f"{prefix}/data/{key}", raw.tobytes())
        z.writestr(f"{prefix}/version", "3\n")
    return str(path)


def synthetic_state(d=512, n_mels=64, seed=0):
    """A v1 (AudioNTT2020) state_dict in PyTorch layouts, random values, no file needed."""
    rng = np.random.default_rng(seed)
    state = {}
    for conv, bn, cin in (("features.0", "features.1", 1), ("features.4", "features.5", 64), ("features.8", "features.9", 64)):
        state[f"{conv}.weight"] = rng.normal(0, 0.3, (64, cin, 3, 3)).astype(np.float32)
        state[f"{conv}.bias"] = rng.normal(0, 0.1, 64).astype(np.float32)
        state[f"{bn}.weight"] = rng.uniform(0.5, 1.5, 64).astype(np.float32)
        state[f"{bn}.bias"] = rng.normal(0, 0.1, 64).astype(np.float32)
        state[f"{bn}.running_mean"] = rng.normal(0, 0.1, 64).astype(np.float32)
        state[f"{bn}.running_var"] = rng.uniform(0.5, 2.0, 64).astype(np.float32)
        state[f"{bn}.num_batches_tracked"] = np.array(10, np.int64)
    features = 64 * n_mels // 8
    state["fc.0.weight"] = rng.normal(0, features**-0.5, (d, features)).astype(np.float32)
    state["fc.0.bias"] = rng.normal(0, 0.1, d).astype(np.float32)
    state["fc.3.weight"] = rng.normal(0, d**-0.5, (d, d)).astype(np.float32)
    state["fc.3.bias"] = rng.normal(0, 0.1, d).astype(np.float32)
    return state


@pytest.fixture(scope="module")
def synthetic_pth(tmp_path_factory):
    """A torch.save-layout v1 file (d=512) built by `write_torch_file`."""
    return write_torch_file(tmp_path_factory.mktemp("pth") / "synthetic_v1.pth", synthetic_state())


def assert_same_weights(a, b):
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(wa), keras.ops.convert_to_numpy(wb))


# --- parity with the official code ---------------------------------------------------


def test_official_v1_d512_parity(shared, reference):
    encoder = weights.load_official(weight_file(shared, V1))
    assert type(encoder).__name__ == "AudioNTT2020" and encoder.d == 512
    x = reference["lms_input"].transpose(0, 2, 3, 1)
    assert_rel_close(encoder(x), reference["emb_v1_d512"])
    assert_rel_close(encoder.frame_encoder(x), reference["frames_v1_d512"])
    assert_rel_close(conv_output(encoder, x), reference["conv_v1_d512"])


def test_synthetic_v2_parity(shared, reference):
    encoder = weights.load_official(weight_file(shared, V2))
    assert type(encoder).__name__ == "AudioNTT2022" and encoder.d == 1280
    assert encoder.get_layer("fc1").units == 256
    x = reference["lms_input"].transpose(0, 2, 3, 1)
    assert_rel_close(encoder(x), reference["emb_v2syn_d1280"])
    assert_rel_close(encoder.frame_encoder(x), reference["frames_v2syn_d1280"])
    assert_rel_close(conv_output(encoder, x), reference["conv_v2syn_d1280"])


def test_waveform_path_v1(shared, reference):
    mean, std = (float(v) for v in reference["norm_stats_v1_readme"])
    model = WaveformEncoder.from_official(weight_file(shared, V1), mean, std, htk=True, version=1)
    assert_rel_close(model(reference["wave"][None]), reference["wave_emb_v1_d512"])
    assert_rel_close(model.embed(reference["wave"]).clip, reference["wave_emb_v1_d512"])


# --- the safe reader ------------------------------------------------------------------


def test_reader_layouts_dtypes_byteorder(tmp_path):
    base = np.arange(40, dtype=np.float32)
    class BF16(np.ndarray):
        torch_dtype = "bfloat16"

    values = np.arange(6, dtype=np.float32) * 0.5  # exact in bfloat16
    bf = (values.view(np.uint32) >> 16).astype(np.uint16).view(BF16)
    obj = {
        "transposed": Strided(base, 0, (4, 5), (1, 4)),
        "offset": Strided(base, 7, (2, 3), (5, 1)),
        "scalar": np.array(3, np.int64),
        "empty": np.zeros((0, 3), np.float32),
        "f64": np.linspace(-1, 1, 6).reshape(2, 3),
        "f16": np.arange(4, dtype=np.float16),
        "bool": np.array([True, False]),
        "bf16": Strided(bf, 0, (2, 3), (3, 1)),
        "meta": {"epoch": 3, "name": "x", "shape": (1, 2)},
    }
    for order in ("little", "big"):
        path = write_torch_file(tmp_path / f"{order}.pth", obj, byteorder=order, prefix="anyname")
        out = weights._torch_zip.load(path)
        np.testing.assert_array_equal(out["transposed"], base[:20].reshape(5, 4).T)
        np.testing.assert_array_equal(out["offset"], base[7:17].reshape(2, 5)[:, :3])
        assert out["scalar"].shape == () and out["scalar"] == 3 and out["scalar"].dtype == np.int64
        assert out["empty"].shape == (0, 3)
        np.testing.assert_array_equal(out["f64"], obj["f64"])
        assert out["f16"].dtype == np.float16 and out["bool"].dtype == np.bool_
        np.testing.assert_array_equal(out["bf16"], (np.arange(6) * 0.5).reshape(2, 3))
        assert out["meta"] == {"epoch": 3, "name": "x", "shape": (1, 2)}


def test_reader_agrees_with_torch_and_needs_no_torch(synthetic_pth, tmp_path):
    path = synthetic_pth
    ours = weights._torch_zip.load(path)
    try:
        import torch
    except ImportError:  # the reader is exercised without torch below in any case
        torch = None
    if torch is not None:
        theirs = torch.load(path, weights_only=True)
        assert list(ours) == list(theirs)
        for key, value in theirs.items():
            np.testing.assert_array_equal(ours[key], value.numpy())
        x = torch.arange(24.0).reshape(4, 6)
        saved = {"t": x.t(), "s": x[1:, 2:], "b": x.to(torch.bfloat16), "p": torch.nn.Parameter(x[0])}
        torch.save(saved, tmp_path / "t.pth")
        loaded = weights._torch_zip.load(tmp_path / "t.pth")
        for key, value in saved.items():
            np.testing.assert_array_equal(loaded[key], value.detach().float().numpy())
    # In a process where `import torch` fails, the reader still gives the same arrays.
    module = os.path.abspath(weights._torch_zip.__file__)
    code = (
        "import sys, importlib.util, hashlib; sys.modules['torch'] = None\n"
        f"spec = importlib.util.spec_from_file_location('tz', {module!r})\n"
        "tz = importlib.util.module_from_spec(spec); spec.loader.exec_module(tz)\n"
        f"sd = tz.load({path!r})\n"
        "print(hashlib.sha256(b''.join(v.tobytes() for v in sd.values())).hexdigest())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import hashlib

    expected = hashlib.sha256(b"".join(v.tobytes() for v in ours.values())).hexdigest()
    assert result.stdout.strip() == expected


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 7},
        lambda sd: {"model": {"body." + k: v for k, v in sd.items()}, "optimizer": {"lr": 1}},
        lambda sd: {"module." + k: v for k, v in sd.items()},
        lambda sd: {**sd, "features.1.num_batches_tracked": np.array(5, np.int64), "head.w": np.ones(2)},
    ],
    ids=["state_dict+model.", "model+body.", "module.", "extra-keys"],
)
def test_wrapped_and_prefixed_checkpoints(synthetic_pth, tmp_path, wrap):
    state = synthetic_state()
    path = write_torch_file(tmp_path / "wrapped.pth", wrap(state))
    assert_same_weights(weights.load_official(path), weights.load_official(synthetic_pth))


def _marker_pickles(marker):
    class Evil:
        def __init__(self, fn, arg):
            self.fn, self.arg = fn, arg

        def __reduce__(self):
            return (self.fn, (self.arg,))

    yield "posix.system", pickle.dumps(Evil(os.system, f"touch {marker}"), protocol=2)
    yield "__builtin__.eval", pickle.dumps(Evil(eval, f"open({str(marker)!r}, 'w')"), protocol=2)
    yield "builtins.exec", pickle.dumps({"features.0.weight": Evil(exec, f"open({str(marker)!r}, 'w')")}, protocol=4)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker"
    cases = list(_marker_pickles(marker))
    # Also hidden deep inside an otherwise valid state_dict, after real tensors.
    state = synthetic_state()
    evil = Raw(_global("posix", "system") + _tuple([_str(f"touch {marker}")]) + b"R")
    cases.append(("posix.system", None))
    for index, (forbidden, data) in enumerate(cases):
        path = tmp_path / f"evil{index}.pth"
        if data is None:
            write_torch_file(path, {"state_dict": {**state, "fc.9.weight": evil}})
        else:
            with zipfile.ZipFile(path, "w") as z:
                z.writestr("archive/data.pkl", data)
                z.writestr("archive/version", "3\n")
        with pytest.raises(weights.ForbiddenGlobalError) as info:
            weights.load_official(path)
        assert isinstance(info.value, pickle.UnpicklingError) and isinstance(info.value, ValueError)
        message = str(info.value)
        assert str(path) in message and forbidden in message, message
        assert not marker.exists()


def test_truncated_corrupt_and_legacy_files(synthetic_pth, tmp_path):
    data = open(synthetic_pth, "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.TorchFileError, match="truncated or corrupt") as info:
        weights.load_official(truncated)
    assert str(truncated) in str(info.value)

    corrupt = tmp_path / "corrupt.pth"
    offset = data.index(b"archive/data/0") + 200  # inside the first conv kernel's 2,304 bytes
    corrupt.write_bytes(data[:offset] + bytes(b ^ 0xFF for b in data[offset : offset + 64]) + data[offset + 64 :])
    with pytest.raises(weights.TorchFileError, match="corrupt") as info:
        weights.load_official(corrupt)
    assert str(corrupt) in str(info.value)

    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
    with pytest.raises(weights.TorchFileError, match="(?i)legacy.*re-save") as info:
        weights.load_official(legacy)
    assert str(legacy) in str(info.value)

    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(weights.TorchFileError, match="not a PyTorch"):
        weights.load_official(text)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        weights.load_official(tmp_path / "missing.pth")


def test_wrong_shapes_and_missing_keys(synthetic_pth, tmp_path):
    state = synthetic_state()
    bad = dict(state, **{"fc.3.weight": np.zeros((512, 256), np.float32)})
    path = write_torch_file(tmp_path / "shape.pth", bad)
    with pytest.raises(weights.TorchFileError, match=r"'fc.3.weight'.*\(256, 512\)") as info:
        weights.load_official(path)
    assert str(path) in str(info.value)

    missing = {k: v for k, v in state.items() if k != "features.5.running_var"}
    path = write_torch_file(tmp_path / "missing.pth", missing)
    with pytest.raises(weights.TorchFileError, match="missing key 'features.5.running_var'") as info:
        weights.load_official(path)
    assert str(path) in str(info.value)

    path = write_torch_file(tmp_path / "nan.pth", dict(state, **{"fc.0.bias": np.full(512, np.nan, np.float32)}))
    with pytest.raises(weights.TorchFileError, match="'fc.0.bias'.*NaN"):
        weights.load_official(path)

    path = write_torch_file(tmp_path / "other.pth", {"encoder.weight": np.ones(3, np.float32)})
    with pytest.raises(weights.TorchFileError, match="no BYOL-A encoder weights.*'encoder.weight'"):
        weights.load_official(path)

    with pytest.raises(weights.TorchFileError, match="version=2 requested.*3 conv blocks"):
        weights.load_official(synthetic_pth, version=2)


# --- saving and the command line --------------------------------------------------------


def test_convert_writes_one_waveform_encoder(synthetic_pth, tmp_path, capsys):
    from byola_keras import cli

    out = tmp_path / "enc" / "encoder.keras"
    assert cli.main(["convert", synthetic_pth, "--out", str(out), "--stats", "-6.5", "4.5", "--htk"]) == 0
    assert "AudioNTT2020" in capsys.readouterr().out
    assert os.listdir(out.parent) == ["encoder.keras"]
    model = keras.saving.load_model(out)
    assert isinstance(model, WaveformEncoder)
    assert (model.mean, model.std, model.htk, model.encoder.d) == (-6.5, 4.5, True, 512)
    assert_same_weights(model.encoder, weights.load_official(synthetic_pth))
    wave = np.random.default_rng(0).normal(0, 0.1, (2, 12000)).astype(np.float32)
    direct = WaveformEncoder(weights.load_official(synthetic_pth), -6.5, 4.5, htk=True)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(wave)), keras.ops.convert_to_numpy(direct(wave)), rtol=1e-5, atol=1e-5
    )
    assert cli.main(["convert", synthetic_pth, "--out", str(tmp_path / "x.h5"), "--stats", "0", "1"]) == 2
    assert "must end with '.keras'" in capsys.readouterr().err
    assert cli.main(["convert", synthetic_pth, "--out", str(tmp_path / "y.keras"), "--stats", "0", "0"]) == 2
    assert "std" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --stats is required: there is no model without statistics
        cli.main(["convert", synthetic_pth, "--out", str(tmp_path / "z.keras")])
    assert "--stats" in capsys.readouterr().err


@pytest.mark.large
def test_cli_convert_official_matches_official_outputs(shared, reference, tmp_path):
    out = tmp_path / "model" / "encoder.keras"
    mean, std = (str(float(v)) for v in reference["norm_stats_v1_readme"])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-m", "byola_keras.cli", "convert", weight_file(shared, V1),
         "--out", str(out), "--stats", mean, std, "--htk", "--backend", backend()],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "AudioNTT2020" in result.stdout and "600,192" in result.stdout
    model = keras.saving.load_model(out)
    assert_rel_close(model(reference["wave"][None]), reference["wave_emb_v1_d512"])
    x = reference["lms_input"].transpose(0, 2, 3, 1)
    assert_rel_close(model.encoder(x), reference["emb_v1_d512"])
