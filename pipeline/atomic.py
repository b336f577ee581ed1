"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Each writer goes to a temporary file in the destination's folder (same filesystem,
so the final ``os.replace`` is atomic) and renames it over the destination
(:func:`replacing`; every writer of the project goes through it).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The errno values of a write that failed because of the destination (full, read-only, no permission).
WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a new empty temporary file next to ``path``; on success rename it over ``path``.

    If the block raises, the temporary file is removed and ``path`` is untouched. The
    file is created with mode 0666 minus the umask, as ``open`` would (not ``mkstemp``'s
    0600): metrics, manifests and models stay readable by the rest of a team.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise _naming(exc, path) from exc
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno not in WRITE_ERRORS:
            raise
        # ENOSPC from deep inside a writer (torch.save, PIL) names no file: say which one failed.
        raise _naming(exc, path) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _naming(exc: OSError, path: Path) -> OSError:
    """The same kind of OSError, with a message that names ``path`` and says nothing was written."""
    reason = exc.strerror or str(exc)
    return type(exc)(exc.errno, f"could not write {path} ({reason}); the previous file, if any, is unchanged")


def check_writable(folder: str | Path, need_bytes: int = 0, what: str = "") -> None:
    """Raise OSError naming ``folder`` (and ``what``, e.g. the params key) unless a file can be created
    in it and its filesystem has ``need_bytes`` free: the check a long run makes before it starts."""
    folder = Path(folder)
    label = f"{what} {folder}" if what else str(folder)
    probe = folder / f".write-probe.{os.getpid()}-{secrets.token_hex(4)}"
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again: a check leaves nothing
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0")
            f.flush()
            os.fsync(f.fileno())
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise type(exc)(exc.errno, f"{label} is not writable ({exc.strerror or exc}): fix the path or its "
                                   f"permissions before training starts") from exc
    finally:
        with contextlib.suppress(OSError):  # e.g. NotADirectoryError when the "folder" is a file
            probe.unlink(missing_ok=True)
        for made in created:
            with contextlib.suppress(OSError):
                made.rmdir()
    if free < need_bytes:
        raise OSError(errno.ENOSPC, f"{label}: {free / 1e6:.1f} MB free, at least {need_bytes / 1e6:.1f} MB needed "
                                    f"(one checkpoint / model): free space or point it elsewhere")


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
