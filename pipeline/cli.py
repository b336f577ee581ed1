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


USAGE = "usage: python stages/<stage>.py [--params FILE] [KEY.PATH=VALUE ...]"


class StageArguments:
    """What a stage was started with: ``--params FILE`` and dotted overrides (``reid.epochs=2``).

    Set by :func:`run_stage` for the duration of the stage's ``main()`` and read by
    :func:`pipeline.config.stage_params`; empty otherwise, so a stage called in-process (a
    test, DVC's ``python stages/x.py``) reads ``params.yaml`` exactly as before.
    """

    params_file: str | None = None
    overrides: tuple[str, ...] = ()


def parse_stage_arguments(argv: list[str]) -> tuple[str | None, tuple[str, ...]]:
    """``[--params FILE] [KEY.PATH=VALUE ...]`` -> (FILE or None, overrides); InputError otherwise."""
    params_file, overrides, rest = None, [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        if arg == "--params" or arg.startswith("--params="):
            params_file = arg.partition("=")[2] if "=" in arg else (rest.pop(0) if rest else "")
            if not params_file:
                raise InputError(f"--params needs a file name ({USAGE})")
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise InputError(f"argument {arg!r}: expected --params FILE or KEY.PATH=VALUE ({USAGE})")
    return params_file, tuple(overrides)


def run_stage(main: Callable[[], Any], argv: list[str] | None = None) -> None:
    """:func:`run` for a stage script that takes ``[--params FILE] [KEY.PATH=VALUE ...]`` (cluster jobs).

    With no arguments it is exactly ``run(main)``.
    """
    try:
        StageArguments.params_file, StageArguments.overrides = parse_stage_arguments(
            sys.argv[1:] if argv is None else argv)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INPUT_ERROR)
    try:
        run(main)
    finally:
        StageArguments.params_file, StageArguments.overrides = None, ()
