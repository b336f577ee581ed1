"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Each writer goes to a temporary file in the destination's folder (same filesystem,
so the final ``os.replace`` is atomic) and renames it over the destination
(:func:`replacing`; every writer of the project goes through it).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a new empty temporary file next to ``path``; on success rename it over ``path``.

    If the block raises, the temporary file is removed and ``path`` is untouched. The
    file is created with mode 0666 minus the umask, as ``open`` would (not ``mkstemp``'s
    0600): metrics, manifests and models stay readable by the rest of a team.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def swap_dir(staging: str | Path, out_dir: str | Path) -> None:
    """Replace the folder ``out_dir`` by the complete folder ``staging``.

    The old folder is moved aside first and removed only after the swap, so ``out_dir``
    is never a mix: it is the whole old output, the whole new one, or (for the instant
    between the two renames) absent.
    """
    staging, out_dir = Path(staging), Path(out_dir)
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)  # left by a crashed run with the same pid (containers reuse pids)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def write_csv(path: str | Path, rows: list[dict[str, Any]], columns: list[str] | None = None,
              number_format: str | None = None) -> Path:
    """Rows of dicts as CSV with a header (``columns``: default the first row's keys).

    ``number_format`` (e.g. ``".6g"``) formats int/float cells; else ``str()``.
    """
    columns = list(columns or (rows[0] if rows else []))

    def cell(value: Any) -> str:
        if number_format and isinstance(value, (int, float)) and not isinstance(value, bool):
            return format(value, number_format)
        return str(value)
    lines = [",".join(columns)] + [",".join(cell(row[c]) for c in columns) for row in rows]
    return write_text(path, "\n".join(lines) + "\n")


def write_png(path: str | Path, image: Any) -> Path:
    """A PIL image (anything with ``save(file, format=...)``) as PNG."""
    with replacing(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
