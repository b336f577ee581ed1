"""The results file every benchmark writes: a Markdown report, printed and saved.

``publish(text, out)`` prints the report and, unless ``out`` is ``-``, writes it to
``out`` atomically. Hand-written conclusions under a ``## Notes`` heading in the old
file survive a re-run; everything above them is replaced.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.atomic import write_text


def publish(text: str, out: str) -> None:
    print(text)
    if out == "-":
        return
    path = Path(out)
    old = path.read_text() if path.exists() else ""
    notes = old[old.index("\n## Notes"):] if "\n## Notes" in old else ""
    write_text(path, text + notes)
