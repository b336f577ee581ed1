"""How a stage script ends when its input is wrong: one clear message, exit status 2, no traceback.

Errors that describe bad input (a params key, a dataset file, a checkpoint that is
missing) derive from :class:`InputError`; the user fixes the input, not the code, so a
traceback would only bury the message. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

EXIT_INPUT_ERROR = 2


class InputError(ValueError):
    """Bad input named in the message (file, key or value, and what was expected)."""


def run(main: Callable[[], Any]) -> None:
    """Call a stage's ``main()``; on :class:`InputError` print ``error: <message>`` to stderr and exit 2."""
    try:
        main()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INPUT_ERROR)
