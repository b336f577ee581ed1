"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Each writer goes to a temporary file in the destination's folder (same filesystem,
so the final ``os.replace`` is atomic) and renames it over the destination.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def swap_dir(staging: str | Path, out_dir: str | Path) -> None:
    """Replace the folder ``out_dir`` by the complete folder ``staging``.

    The old folder is moved aside first and removed only after the swap, so at every
    moment ``out_dir`` is either the whole old output or the whole new one.
    """
    staging, out_dir = Path(staging), Path(out_dir)
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)
