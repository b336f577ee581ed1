"""Progress reporting for every long-running stage: one mechanism, three modes.

Training, rendering, sharding, mask inference and embedding extraction all report
through :func:`progress`, which picks one of three modes when it is created:

``bar``
    The stream is a terminal: a `tqdm` bar (redrawn at most every 0.5 s) with the
    count, rate, ETA and any postfix (loss, validation figures).
``plain``
    The stream is not a terminal (CI logs, SLURM log files, DVC capturing output):
    a bar's carriage returns would turn a log into one huge unreadable line, so
    instead a full line such as ``train: 120/360 batch (33%) 12.3 batch/s loss=3.214``
    is written at most every ``interval`` seconds (default 30 s), plus always a final
    line at close with the elapsed time. No ``'\\r'`` is ever written in this mode.
``off``
    ``enabled=False`` (every rank but 0 passes it, so only one process prints): no
    output at all, but iteration and counting still work, so callers need no ``if``.

The environment variable ``PVEN_PROGRESS=bar|plain|off`` forces a mode (``off``
silences even rank 0; ``bar``/``plain`` never make a disabled rank print), and
``PVEN_PROGRESS_INTERVAL`` (seconds) sets the default interval of the plain mode.
``interval=0`` prints at every update, and ``clock`` can be injected, for tests.
"""
from __future__ import annotations

import numbers
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

MODES = ("bar", "plain", "off")
DEFAULT_INTERVAL = 30.0
BAR_MININTERVAL = 0.5


def _fmt(value: Any) -> str:
    """Floats with 4 significant digits; 0-d tensors and numpy scalars as numbers."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, numbers.Integral):
        return str(value)
    if isinstance(value, numbers.Real):
        return f"{float(value):.4g}"
    return str(value)


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _select_mode(enabled: bool, stream: TextIO) -> str:
    forced = os.environ.get("PVEN_PROGRESS", "").strip().lower()
    if forced not in ("", "auto") + MODES:
        raise ValueError(f"PVEN_PROGRESS={forced!r}: expected one of {', '.join(MODES)}")
    if not enabled or forced == "off":
        return "off"
    if forced in ("bar", "plain"):
        return forced
    return "bar" if _is_tty(stream) else "plain"


class Progress:
    """What :func:`progress` returns: iterate over it, or drive it by hand."""

    def __init__(self, iterable: Iterable | None, *, total: int | None, desc: str, unit: str,
                 enabled: bool, stream: TextIO | None, interval: float | None, leave: bool,
                 clock: Callable[[], float] | None):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        if interval is None:
            interval = float(os.environ.get("PVEN_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.stream: TextIO = sys.stderr if stream is None else stream
        self.mode = _select_mode(enabled, self.stream)
        self.interval, self.n, self.closed = interval, 0, False
        self._clock = clock or time.monotonic
        self._start = self._last = self._clock()
        self._postfix: dict[str, str] = {}
        self._bar = None
        if self.mode == "bar":
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=leave,
                             mininterval=BAR_MININTERVAL, dynamic_ncols=True)

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("progress() was given no iterable; use update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "plain":
            now = self._clock()
            if now - self._last >= self.interval:
                self._last = now
                self._emit(self._status(now))

    def set_postfix(self, **values: Any) -> None:
        """Replace the figures shown after the count (floats to 4 significant digits)."""
        self._postfix = {k: _fmt(v) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(self._postfix, refresh=False)

    def write(self, line: str) -> None:
        """Print a whole line (an epoch summary, say) without breaking the bar."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        elif self.mode == "plain":
            self._emit(line)

    def close(self) -> None:
        """Finish: close the bar, or write the final plain line. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "plain":
            now = self._clock()
            self._emit(f"{self._status(now)} done in {now - self._start:.1f}s")

    def _status(self, now: float) -> str:
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total is not None else ""),
                 self.unit]
        if self.total:
            parts.append(f"({100 * self.n // self.total}%)")
        elapsed = now - self._start
        if elapsed > 0:
            rate = self.n / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s" if rate < 100 else f"{rate:.0f} {self.unit}/s")
        parts += [f"{k}={v}" for k, v in self._postfix.items()]
        return " ".join(parts)

    def _emit(self, line: str) -> None:
        self.stream.write(line.replace("\r", "") + "\n")
        self.stream.flush()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str,
             unit: str = "it", enabled: bool = True, stream: TextIO | None = None,
             interval: float | None = None, leave: bool = True,
             clock: Callable[[], float] | None = None) -> Progress:
    """Report progress over ``iterable`` (or by hand with ``update``); see the module doc.

    ``total`` defaults to ``len(iterable)`` when it has one; ``None`` shows a count only.
    ``stream`` defaults to ``sys.stderr``; ``interval`` (plain mode, seconds) defaults to
    ``$PVEN_PROGRESS_INTERVAL`` or 30; ``leave=False`` removes a finished bar (inner loops).
    """
    return Progress(iterable, total=total, desc=desc, unit=unit, enabled=enabled,
                    stream=stream, interval=interval, leave=leave, clock=clock)
