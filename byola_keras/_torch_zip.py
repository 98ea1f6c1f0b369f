"""Read PyTorch `torch.save` files into NumPy arrays without torch and without running code.

A `torch.save` file (torch >= 1.6) is a zip archive: `<name>/data.pkl` holds a
pickle of the saved object in which every tensor is a call to
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and every
storage is a *persistent id* `("storage", torch.FloatStorage, key, location,
numel)` whose bytes are the record `<name>/data/<key>`; `<name>/byteorder`
("little" or "big") is present in files from recent torch versions.

Pickle can call any importable function, so the unpickler here resolves only
the few globals a state_dict needs (an allow-list, see `_ALLOWED`); any other
global (`os.system`, `builtins.eval`, a class with a `__reduce__` trick, ...)
stops loading with `ForbiddenGlobalError` before anything is called. Tensors
become NumPy arrays (bfloat16 is widened to float32).
"""

import io
import os
import pickle
import zipfile
from collections import OrderedDict

import numpy as np


class TorchFileError(ValueError):
    """A `.pth` file that cannot be read (corrupt, truncated, legacy format, bad content)."""


class ForbiddenGlobalError(TorchFileError, pickle.UnpicklingError):
    """The pickle in a `.pth` file refers to a global outside the state_dict allow-list."""

    def __init__(self, path, module, name):
        self.path = str(path)
        self.module = module
        self.name = name
        super().__init__(
            f"{path}: refusing to load: its pickle refers to `{module}.{name}`, which is not "
            "needed by a PyTorch state_dict and could run code. Nothing from the file was "
            "executed. Only plain state_dicts of tensors are read; if the file is yours, "
            "re-save just the weights: `torch.save(model.state_dict(), path)`."
        )


# Storage classes in the pickle -> NumPy dtype (None: bfloat16, handled separately).
_STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "BFloat16Storage": None,
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "UntypedStorage": "u1",
}


class _StorageType:
    """Stands in for `torch.<X>Storage` inside the pickle; immutable."""

    __slots__ = ("_name",)

    def __init__(self, name):
        object.__setattr__(self, "_name", name)

    def __setattr__(self, key, value):
        raise AttributeError("read-only")

    @property
    def name(self):
        return self._name

    def __call__(self, *args, **kwargs):
        raise TorchFileError(f"unexpected call of torch.{self._name} in the pickle")


class _Storage:
    """A storage read from the archive: a flat, read-only NumPy array; immutable."""

    __slots__ = ("array",)

    def __init__(self, array):
        object.__setattr__(self, "array", array)

    def __setattr__(self, key, value):
        raise AttributeError("read-only")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value, what):
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
        raise TorchFileError(f"tensor {what} must be a tuple of ints; got {value!r}")
    return tuple(int(v) for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """`torch._utils._rebuild_tensor_v2` for NumPy: a strided view of the storage, copied."""
    if not isinstance(storage, _Storage):
        raise TorchFileError(f"tensor storage must come from the archive; got {type(storage)}")
    if not _is_int(storage_offset) or storage_offset < 0:
        raise TorchFileError(f"bad tensor storage offset {storage_offset!r}")
    size = _int_tuple(size, "size")
    stride = _int_tuple(stride, "stride")
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise TorchFileError(f"bad tensor size {size} / stride {stride}")
    flat = storage.array
    if 0 in size:
        return np.zeros(size, dtype=flat.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.shape[0]:
        raise TorchFileError(
            f"tensor of size {size}, stride {stride}, offset {storage_offset} reads past the "
            f"end of its storage ({flat.shape[0]} elements)"
        )
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[storage_offset:],
        shape=size,
        strides=tuple(s * itemsize for s in stride),
        writeable=False,
    )
    return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
    if not isinstance(data, np.ndarray):
        raise TorchFileError(f"parameter data must be a tensor; got {type(data)}")
    return data


def _device(*args):
    if not all(isinstance(a, (str, int)) for a in args):
        raise TorchFileError(f"bad torch.device arguments {args!r}")
    return ":".join(str(a) for a in args)


def _size(values=()):
    return _int_tuple(tuple(values), "torch.Size")


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles store `bytes` as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise TorchFileError(f"unexpected _codecs.encode({text!r:.40}, {encoding!r})")
    return text.encode("latin1")


def _ordered_dict(*args):
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict))):
        raise TorchFileError("unexpected OrderedDict arguments in the pickle")
    return OrderedDict(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "device"): _device,
    ("torch", "Size"): _size,
    ("_codecs", "encode"): _codecs_encode,
}
for _name in _STORAGE_DTYPES:
    _ALLOWED[("torch", _name)] = _StorageType(_name)
_ALLOWED[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path, archive, prefix, byteorder):
        super().__init__(file)
        self._path = path
        self._archive = archive
        self._prefix = prefix
        self._byteorder = byteorder
        self._storages = {}

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise ForbiddenGlobalError(self._path, module, name) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFileError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"unexpected storage type {storage_type!r:.80}")
        if not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise TorchFileError(f"bad storage record {pid!r:.80}")
        cache_key = (key, storage_type.name)
        if cache_key not in self._storages:
            self._storages[cache_key] = _Storage(self._read_storage(storage_type.name, key, numel))
        return self._storages[cache_key]

    def _read_storage(self, type_name, key, numel):
        record = f"{self._prefix}data/{key}"
        try:
            raw = self._archive.read(record)
        except KeyError:
            raise TorchFileError(f"storage record {record!r} is missing") from None
        code = _STORAGE_DTYPES[type_name]
        order = ">" if self._byteorder == "big" else "<"
        if code is None:  # bfloat16: the high half of a float32
            dtype = np.dtype(order + "u2")
        elif code in ("?", "i1", "u1"):
            dtype = np.dtype(code)
        else:
            dtype = np.dtype(order + code)
        if type_name == "UntypedStorage":
            numel = len(raw)
        if len(raw) < numel * dtype.itemsize:
            raise TorchFileError(
                f"storage record {record!r} holds {len(raw)} bytes, fewer than "
                f"{numel} x {dtype.itemsize} (truncated?)"
            )
        array = np.frombuffer(raw, dtype=dtype, count=numel)
        if code is None:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        else:
            array = array.astype(dtype.newbyteorder("="), copy=False)
        return array


def _not_zip_message(path, head):
    if head.startswith(b"PK"):
        return f"{path}: truncated or corrupt zip archive (cannot read it as a torch.save file)."
    if head[:1] == b"\x80" or len(head) >= 262 and head[257:262] == b"ustar":
        return (
            f"{path}: legacy (pre-zip) PyTorch serialization format, which cannot be read "
            "safely without torch. Re-save it with a recent torch (>= 1.6): "
            "`torch.save(torch.load(path, weights_only=True), new_path)`."
        )
    return f"{path}: not a PyTorch .pth file (no zip archive found)."


def load(path):
    """Load the object saved by `torch.save` at `path`, with tensors as NumPy arrays.

    Only plain containers (dict/OrderedDict, list, tuple, str, numbers) and
    tensors are accepted; any other global in the pickle raises
    `ForbiddenGlobalError` and nothing from the file is executed.

    Args:
        path: path of a zip-format `torch.save` file.

    Returns:
        The unpickled object; every tensor is a `np.ndarray` of its dtype.

    Raises:
        FileNotFoundError: `path` does not exist.
        ForbiddenGlobalError: the pickle refers to a global outside the allow-list.
        TorchFileError: truncated/corrupt/legacy file, or inconsistent tensor records.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(512)
    if not zipfile.is_zipfile(path):
        raise TorchFileError(_not_zip_message(path, head))
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                hint = " (a TorchScript archive?)" if any(n.endswith("constants.pkl") for n in names) else ""
                raise TorchFileError(
                    f"{path}: expected exactly one `<name>/data.pkl` record in the zip, "
                    f"found {len(pickles)}{hint}; not a torch.save file."
                )
            prefix = pickles[0][: -len("data.pkl")]
            byteorder = "little"
            if prefix + "byteorder" in names:
                byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
                if byteorder not in ("little", "big"):
                    raise TorchFileError(f"{path}: unknown byteorder record {byteorder!r}")
            data = archive.read(pickles[0])
            unpickler = _RestrictedUnpickler(io.BytesIO(data), path, archive, prefix, byteorder)
            try:
                return unpickler.load()
            except ForbiddenGlobalError:
                raise
            except TorchFileError as error:
                raise TorchFileError(f"{path}: {error}") from None
            except (zipfile.BadZipFile, OSError):
                raise
            except Exception as error:  # malformed pickle: wrong types, bad opcodes, ...
                raise TorchFileError(
                    f"{path}: corrupt pickle in the PyTorch file ({type(error).__name__}: {error})."
                ) from None
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError, OSError) as error:
        if isinstance(error, TorchFileError):
            raise
        raise TorchFileError(f"{path}: truncated or corrupt PyTorch file ({error}).") from error
