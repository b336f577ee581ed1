"""check_params stage: validate the whole params.yaml before any other stage touches its outputs.

    dvc repro check_params
    python stages/check_params.py           # the same, by hand

Depends on the params file itself, so it runs first whenever params.yaml changes, also
for a key that no stage reads (a typo in a new section is an error here, not ignored).
Every other stage depends on its output, a gate file whose content never changes, so a
valid change reruns only the stages that read it, while an invalid one stops `dvc repro`
and `dvc exp run` here: no stage after it starts, no output of theirs is removed. A bad
value ends with one line, ``error: params.yaml: <key>: got ..., expected ...``, exit 2.
"""
from pathlib import Path

from pipeline import atomic, cli
from pipeline.config import Params, ParamsView, load_params

PARAMS = ()   # reads the file as a whole (a file dependency in dvc.yaml)
GATE = Path("reports/params_check.json")


def main(params: Params | ParamsView | None = None, root: str | Path = ".") -> dict:
    """Validate ``root``/params.yaml (``params`` is accepted for symmetry and not used: the file is checked)."""
    root = Path(root)
    load_params(root / "params.yaml")
    gate = {"params.yaml": "valid"}
    atomic.write_json(root / GATE, gate)
    return gate


if __name__ == "__main__":
    cli.run(main)
