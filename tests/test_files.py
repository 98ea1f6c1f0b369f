"""byola_keras._files: a failed write names the file, what it holds and its
size, and leaves no temporary file; the test hook that fails a chosen write."""

import errno
import os
import pickle

import pytest

from byola_keras import _files


def test_failed_atomic_write_names_the_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "state.bin"
    path.write_bytes(b"previous")
    monkeypatch.setenv(_files.WRITE_FAIL_ENV, "state.bin:2:EDQUOT")
    _files.atomic_write(path, lambda f: f.write(b"x" * 10), what="the state", size=10)  # 1st: written
    assert path.read_bytes() == b"x" * 10
    with pytest.raises(_files.WriteFailed) as info:
        _files.atomic_write(path, lambda f: f.write(b"y" * 2500), what="the state", size=2500)
    error = info.value
    assert isinstance(error, OSError) and error.errno == errno.EDQUOT
    assert str(error) == f"Could not write the state '{path}' (2.5 kB): Disk quota exceeded (EDQUOT)."
    assert path.read_bytes() == b"x" * 10  # the previous file is intact
    assert os.listdir(tmp_path) == ["state.bin"]  # no temporary left
    error.hint = "Run again."
    assert pickle.loads(pickle.dumps(error)).__str__() == str(error)


def test_failed_save_through_a_file_name(tmp_path, monkeypatch):
    monkeypatch.setenv(_files.WRITE_FAIL_ENV, "model.keras")
    with pytest.raises(_files.WriteFailed, match=r"the model '.*model\.keras' \(3 bytes written when it failed\): "
                       r"No space left on device \(ENOSPC\)"):
        _files.atomic_save(tmp_path / "model.keras", lambda tmp: open(tmp, "wb").write(b"abc"), what="the model")
    assert os.listdir(tmp_path) == []

    def no_space(tmp):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.delenv(_files.WRITE_FAIL_ENV)
    with pytest.raises(_files.WriteFailed, match="it failed before its first byte"):
        _files.atomic_save(tmp_path / "model.keras", no_space, what="the model")
    assert os.listdir(tmp_path) == []


def test_lock_of_a_folder_that_cannot_be_made_says_so(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(_files.WriteFailed) as info:
        _files.FolderLock(blocker / "out", "output folder").acquire()
    message = str(info.value)
    assert message.startswith(f"Could not write the output folder's lock '{blocker / 'out' / '.lock'}'")
    assert message.endswith("or choose another folder.")
