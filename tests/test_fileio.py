"""Atomic writes and folders with the user's umask; a failed write leaves no temporary file."""

from __future__ import annotations

import errno
import os

import pytest
from helpers.files import file_mode as _mode

from pyra_bench import fileio
from pyra_bench.errors import InputError, OutputPathError


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                     (0o002, 0o664, 0o775)])
def test_files_and_folders_get_what_open_and_mkdir_would_give(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    # the reference: what a plain open() / mkdir give under this umask
    with open(tmp_path / "plain.txt", "w"):
        pass
    os.mkdir(tmp_path / "plain_dir")
    assert (_mode(tmp_path / "plain.txt"), _mode(tmp_path / "plain_dir")) == (file_mode, dir_mode)
    p = fileio.atomic_write_text(tmp_path / "new" / "sub" / "rec.json", '{"a": 1}\n')
    assert p.read_text() == '{"a": 1}\n'
    assert _mode(p) == file_mode and _mode(tmp_path / "new") == dir_mode and _mode(tmp_path / "new" / "sub") == dir_mode
    assert _mode(fileio.make_dir(tmp_path / "a" / "b")) == dir_mode
    assert _mode(fileio.make_temp_dir(tmp_path, prefix=".x.partial-")) == dir_mode


def test_replacing_a_file_gives_it_the_umask_mode_and_the_new_content(tmp_path, umask):
    umask(0o022)
    p = tmp_path / "rec.json"
    p.write_bytes(b"old")
    os.chmod(p, 0o600)  # e.g. written by an older version through tempfile.mkstemp
    fileio.atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new" and _mode(p) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["rec.json"]


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch, fail_at):
    p = tmp_path / "inference_model.json"
    p.write_bytes(b"old")

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fail_at == "fsync":
        monkeypatch.setattr(fileio.os, "fsync", disk_full)
    elif fail_at == "replace":
        monkeypatch.setattr(fileio.os, "replace", disk_full)
    data = "not bytes" if fail_at == "write" else b"new"  # a TypeError inside the write
    with pytest.raises((OSError, TypeError)):
        fileio.atomic_write_bytes(p, data)
    assert p.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["inference_model.json"]


def test_the_rename_is_followed_by_an_fsync_of_the_folder(tmp_path, monkeypatch):
    calls = []
    real_replace = os.replace
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: calls.append(("replace", b)) or real_replace(a, b))
    monkeypatch.setattr(fileio, "fsync_dir", lambda d: calls.append(("fsync_dir", d)))
    fileio.atomic_write_bytes(tmp_path / "r.json", b"{}")
    assert calls == [("replace", tmp_path / "r.json"), ("fsync_dir", tmp_path)]
    monkeypatch.undo()
    fileio.fsync_dir(tmp_path)
    fileio.fsync_dir(tmp_path / "missing")  # a no-op where a folder cannot be opened


def test_folders_that_cannot_be_made_are_refused_by_name(tmp_path):
    f = tmp_path / "results"
    f.write_text("a file")
    with pytest.raises(OutputPathError, match=f"results folder {f} exists but is not a folder") as e:
        fileio.make_dir(f, "results folder")
    assert isinstance(e.value, InputError) and isinstance(e.value, OSError)
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        fileio.make_dir(f / "sub")
    with pytest.raises(OutputPathError, match="not a folder"):
        fileio.atomic_write_text(f / "rec.json", "{}")
    # checked without writing anything
    with pytest.raises(OutputPathError, match="exists but is not a folder"):
        fileio.check_writable_dir(f)
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        fileio.check_writable_dir(f / "a" / "b")
    assert fileio.check_writable_dir(tmp_path / "x" / "y") == tmp_path / "x" / "y"
    assert not (tmp_path / "x").exists()


def test_an_unwritable_folder_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.os, "access", lambda p, mode: False)  # (root may write anywhere)
    with pytest.raises(OutputPathError, match=f"{tmp_path}.* is not writable"):
        fileio.check_writable_dir(tmp_path / "new")
