"""atomic_write: the old file survives a failed write, the new one gets the umask's permissions (not 0600), and
both it and its folder are flushed to disk."""

import os

import pytest

from faceforge.fileio import atomic_write


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def broken(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_written_file_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").close())
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_the_file_is_flushed_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import faceforge.fileio as fileio

    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: calls.append(("replace", str(b))) or real_replace(a, b))
    atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").write("x"))
    assert [kind for kind, _ in calls] == ["fsync", "replace", "fsync"]
    assert calls[0][1].startswith(str(tmp_path / ".a.txt.")) and calls[2][1] == str(tmp_path)
