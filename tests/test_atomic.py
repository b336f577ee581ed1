"""Atomic writes: all or nothing, and files readable like any other (umask, not 0600)."""
import os
import stat

import pytest

from pipeline import atomic


def test_replacing_keeps_the_old_file_on_error_and_leaves_no_temp(tmp_path):
    target = tmp_path / "metrics.json"
    atomic.write_json(target, {"mAP": 0.5})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == '{\n  "mAP": 0.5\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic.write_text(tmp_path / "sub" / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp alone would give 0o600
