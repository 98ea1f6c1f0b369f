"""Use the official pretrained BYOL-A weights (PyTorch `.pth` files) from Keras.

The official files (github.com/nttcslab/byol-a, `pretrained_weights/`) hold the
`state_dict` of the encoder: `features.{0,4,8}` convolutions, `features.{1,5,9}`
batch norms (v1, AudioNTT2020; v2 has blocks 0/1 and 4/5 only) and the MLP
`fc.0` / `fc.3`. They are read with a restricted unpickler that needs no torch
and never runs code from the file (`byola_keras._torch_zip`), and converted:

- Conv2d weight `(out, in, kh, kw)` -> Conv2D kernel `(kh, kw, in, out)`.
- BatchNorm2d `weight, bias, running_mean, running_var` -> BatchNormalization
  `gamma, beta, moving_mean, moving_variance` (epsilon 1e-5, as in PyTorch).
- Linear weight `(out, in)` -> Dense kernel `(in, out)`.

The version and width are inferred from the shapes: three conv blocks is v1,
`AudioNTT2020(d=fc.0.weight.shape[0])`; two is v2,
`AudioNTT2022(d=fc.0.weight.shape[1] + fc.0.weight.shape[0])` (1,024 local
features + the MLP width). Checkpoints wrapped in a `state_dict` or `model`
entry, or with keys prefixed by `model.`, `body.` or `module.`, load as well.

The official weights are licensed for evaluation only: download them yourself;
this package neither ships nor copies them.

`convert` wraps the encoder with the front-end and the statistics in a
`WaveformEncoder` and saves it as one `.keras` file:

    byola-keras convert AudioNTT2020-BYOLA-64x96d2048.pth --out encoder.keras \\
        --stats MEAN STD
"""

import os
import sys

import numpy as np

from byola_keras import _torch_zip
from byola_keras._torch_zip import ForbiddenGlobalError, TorchFileError

__all__ = [
    "ForbiddenGlobalError",
    "TorchFileError",
    "read_state_dict",
    "infer_architecture",
    "state_dict_to_keras",
    "load_official",
    "convert",
]

_PREFIXES = ("module.", "model.", "body.")
_WRAPPERS = ("state_dict", "model")

# Official state_dict prefix -> Keras layer name, per version.
_CONV_LAYERS = {1: ("features.0", "features.4", "features.8"), 2: ("features.0", "features.4")}
_BN_LAYERS = {1: ("features.1", "features.5", "features.9"), 2: ("features.1", "features.5")}


def _unwrap(obj, path):
    for _ in range(4):
        if not isinstance(obj, dict):
            raise TorchFileError(
                f"{path}: expected a state_dict (a dict of tensors); found {type(obj).__name__}."
            )
        inner = [k for k in _WRAPPERS if isinstance(obj.get(k), dict)]
        if not inner or any(isinstance(k, str) and _strip(k).startswith(("features.", "fc.")) for k in obj):
            return obj
        obj = obj[inner[0]]
    return obj


def _strip(key):
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def read_state_dict(path):
    """Read the encoder's `features.*` / `fc.*` tensors from a `.pth` file.

    Unwraps a `state_dict` or `model` entry, strips leading `module.`, `model.`
    and `body.` from the keys, keeps `features.*` and `fc.*` and drops the
    `num_batches_tracked` counters. No torch needed; nothing in the file is run.

    Args:
        path: a zip-format `torch.save` file.

    Returns:
        dict of key -> float32 `np.ndarray` (PyTorch layouts).

    Raises:
        ForbiddenGlobalError: the file's pickle refers to code outside a state_dict.
        TorchFileError: unreadable file, no encoder keys, duplicate keys, non-tensors.
    """
    path = os.fspath(path)
    obj = _unwrap(_torch_zip.load(path), path)
    out = {}
    for raw_key, value in obj.items():
        if not isinstance(raw_key, str):
            continue
        key = _strip(raw_key)
        if not key.startswith(("features.", "fc.")) or key.endswith("num_batches_tracked"):
            continue
        if key in out:
            raise TorchFileError(f"{path}: key {key!r} appears twice (as {raw_key!r} and another).")
        if not isinstance(value, np.ndarray):
            raise TorchFileError(f"{path}: {raw_key!r} is a {type(value).__name__}, not a tensor.")
        out[key] = value
    if not out:
        shown = ", ".join(repr(k) for k in list(obj)[:8])
        raise TorchFileError(
            f"{path}: no BYOL-A encoder weights (`features.*`, `fc.*` keys) found; "
            f"top-level keys: {shown or 'none'}."
        )
    return out


def _require(state, key, ndim, path):
    if key not in state:
        raise TorchFileError(f"{path}: missing key {key!r} (found: {', '.join(sorted(state))}).")
    value = state[key]
    if value.ndim != ndim:
        raise TorchFileError(
            f"{path}: key {key!r} has shape {value.shape}; expected a {ndim}-D tensor."
        )
    return value


def _parse_version(version):
    if version is None:
        return None
    table = {1: 1, 2: 2, "1": 1, "2": 2, "v1": 1, "v2": 2, "2020": 1, "2022": 2, 2020: 1, 2022: 2}
    key = version.lower() if isinstance(version, str) else version
    if key not in table:
        raise ValueError(f"`version` must be 1, 2 or None (infer); got {version!r}.")
    return table[key]


def infer_architecture(state, version=None, path="<state_dict>"):
    """Version, embedding size and mel bins implied by the tensor shapes.

    Args:
        state: dict from `read_state_dict`.
        version: 1 or 2 to insist on a version (error if the shapes disagree), or None.
        path: file name used in error messages.

    Returns:
        `(version, d, n_mels)`.
    """
    inferred = 1 if "features.8.weight" in state else 2
    wanted = _parse_version(version)
    if wanted is not None and wanted != inferred:
        blocks = 3 if inferred == 1 else 2
        raise TorchFileError(
            f"{path}: version={version!r} requested, but the file has {blocks} conv blocks "
            f"(v{inferred}: {'AudioNTT2020' if inferred == 1 else 'AudioNTT2022'})."
        )
    fc0 = _require(state, "fc.0.weight", 2, path)
    hidden, in_features = (int(n) for n in fc0.shape)
    filters = int(_require(state, "features.0.weight", 4, path).shape[0])
    pools = 8 if inferred == 1 else 4
    n_mels, remainder = divmod(in_features * pools, filters)
    if remainder or n_mels <= 0 or n_mels % pools:
        raise TorchFileError(
            f"{path}: key 'fc.0.weight' has shape {fc0.shape}: its {in_features} inputs are "
            f"not {filters} channels x mel bins / {pools} (v{inferred})."
        )
    d = hidden if inferred == 1 else in_features + hidden
    return inferred, d, n_mels


def _torch_weights_for(version, state, path):
    """Keras layer name -> list of arrays in Keras layout, shapes not yet checked."""
    out = {}
    for index, key in enumerate(_CONV_LAYERS[version], start=1):
        kernel = _require(state, f"{key}.weight", 4, path)
        out[f"conv{index}"] = [
            (f"{key}.weight", np.transpose(kernel, (2, 3, 1, 0))),
            (f"{key}.bias", _require(state, f"{key}.bias", 1, path)),
        ]
    for index, key in enumerate(_BN_LAYERS[version], start=1):
        out[f"bn{index}"] = [
            (f"{key}.{name}", _require(state, f"{key}.{name}", 1, path))
            for name in ("weight", "bias", "running_mean", "running_var")
        ]
    for name, key in (("fc1", "fc.0"), ("fc2", "fc.3")):
        out[name] = [
            (f"{key}.weight", np.transpose(_require(state, f"{key}.weight", 2, path))),
            (f"{key}.bias", _require(state, f"{key}.bias", 1, path)),
        ]
    used = {key for pairs in out.values() for key, _ in pairs}
    unknown = sorted(set(state) - used)
    if unknown:
        raise TorchFileError(
            f"{path}: unexpected encoder keys {', '.join(unknown)} for v{version} "
            f"({'AudioNTT2020' if version == 1 else 'AudioNTT2022'})."
        )
    return out


def state_dict_to_keras(state, encoder=None, version=None, path="<state_dict>"):
    """Copy an official state_dict (NumPy arrays, PyTorch layouts) into a Keras encoder.

    Args:
        state: dict of `features.*` / `fc.*` arrays, as from `read_state_dict`.
        encoder: an `AudioNTT2020` / `AudioNTT2022` to fill; None builds the one the
            shapes imply.
        version: 1, 2 or None (infer).
        path: file name used in error messages.

    Returns:
        The encoder, with the weights set.
    """
    from byola_keras.models import AudioNTT2020, AudioNTT2022

    inferred, d, n_mels = infer_architecture(state, version, path)
    if encoder is None:
        cls = AudioNTT2020 if inferred == 1 else AudioNTT2022
        encoder = cls(d=d, n_mels=n_mels)
    elif getattr(encoder, "num_blocks", None) != (3 if inferred == 1 else 2):
        raise ValueError(
            f"{path}: the file is a v{inferred} encoder, but `encoder` is "
            f"{type(encoder).__name__}."
        )
    label = f"{type(encoder).__name__}(d={getattr(encoder, 'd', '?')}, n_mels={n_mels})"
    assignments = []
    for layer_name, pairs in _torch_weights_for(inferred, state, path).items():
        layer = encoder.get_layer(layer_name)
        variables = layer.weights
        if len(variables) != len(pairs):
            raise ValueError(f"{label}: layer {layer_name!r} has {len(variables)} weights.")
        for variable, (key, value) in zip(variables, pairs):
            if tuple(variable.shape) != tuple(value.shape):
                raise TorchFileError(
                    f"{path}: key {key!r} does not fit {label} layer {layer_name!r}: "
                    f"Keras needs {tuple(variable.shape)}, the file gives {tuple(value.shape)} "
                    "(after the PyTorch -> Keras transpose)."
                )
            if not np.issubdtype(value.dtype, np.floating):
                raise TorchFileError(f"{path}: key {key!r} has dtype {value.dtype}, not float.")
            if not np.all(np.isfinite(value)):
                raise TorchFileError(f"{path}: key {key!r} holds NaN or infinite values.")
            if key.endswith("running_var") and np.any(value < 0):
                raise TorchFileError(f"{path}: key {key!r} holds negative variances.")
            assignments.append((variable, value.astype(np.float32)))
    for variable, value in assignments:
        variable.assign(value)
    return encoder


def load_official(path, version=None):
    """Build a Keras encoder holding the weights of an official BYOL-A `.pth` file.

    Args:
        path: an official (or same-layout) state_dict file, e.g.
            `AudioNTT2020-BYOLA-64x96d2048.pth` or `AudioNTT2022-BYOLA-64x96d2048.pth`.
        version: 1 (AudioNTT2020), 2 (AudioNTT2022) or None to infer from the shapes.

    Returns:
        An `AudioNTT2020` or `AudioNTT2022` model (inference: call with
        `training=False`, the default).

    Example:

    >>> encoder = load_official("AudioNTT2020-BYOLA-64x96d2048.pth")
    >>> encoder(np.zeros((1, 64, 96, 1))).shape
    (1, 2048)
    """
    path = os.fspath(path)
    return state_dict_to_keras(read_state_dict(path), version=version, path=path)


def convert(path, out, mean, std, htk=False, version=None):
    """Convert an official `.pth` file to a `WaveformEncoder` saved as one `.keras` file.

    Args:
        path: the `.pth` file (read, never copied).
        out: the `.keras` file to write; its folder is created.
        mean, std: scalar statistics of the log-mels the encoder will see.
        htk: HTK mel filters in the front-end instead of Slaney's.
        version: 1, 2 or None (infer).

    Returns:
        The `WaveformEncoder`.
    """
    from byola_keras.models import WaveformEncoder

    out = os.fspath(out)
    if not out.endswith(".keras"):
        raise ValueError(f"`out` must end with '.keras'; got {out!r}.")
    if os.path.abspath(out) == os.path.abspath(os.fspath(path)):
        raise ValueError(f"`out` must differ from the input file {path!r}.")
    model = WaveformEncoder.from_official(path, mean, std, htk=htk, version=version)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    model.save(out)
    return model



def run_cli(args):
    """`byola-keras convert WEIGHTS.pth --out encoder.keras --stats MEAN STD [--htk]`."""
    mean, std = args.stats
    try:
        model = convert(args.weights, args.out, mean, std, htk=args.htk, version=args.version)
    except (OSError, ValueError) as error:
        print(f"byola-keras convert: error: {error}", file=sys.stderr)
        return 2
    encoder = model.encoder
    trainable = sum(int(np.prod(w.shape)) for w in encoder.trainable_weights)
    print(
        f"Converted {args.weights} -> {args.out} ({type(encoder).__name__}, d={encoder.d}, "
        f"{trainable:,} trainable parameters; {'HTK' if model.htk else 'Slaney'} front-end, "
        f"mean {model.mean:.6g}, std {model.std:.6g})"
    )
    return 0
