import os
import stat

import pytest

from selfclassifier_core.store.fsutil import atomic_open, atomic_write_json, atomic_write_text, is_within


def test_atomic_write_replaces_and_uses_umask(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]  # no temp files left


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as fh:
            fh.write("partial")
            raise RuntimeError("crash mid-write")
    assert target.read_text().strip().startswith("{")
    assert '"a": 1' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_is_within(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert is_within(tmp_path / "a" / "b", tmp_path / "a")
    assert is_within(tmp_path / "a", tmp_path / "a")
    assert not is_within(tmp_path / "a", tmp_path / "a" / "b")
    assert not is_within(tmp_path / "ab", tmp_path / "a")
