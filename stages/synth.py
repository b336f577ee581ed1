"""synth stage: render the synthetic vehicle dataset (the embedded default) in the VeRi-776 layout.

    dvc repro synth                 # as part of the pipeline
    python stages/synth.py          # the same, by hand (reads ./params.yaml)

Reads params ``seed`` and ``synth``. Writes ``synth.out_dir`` (images, name lists, label
PNGs, views.csv), ``reports/synth_contact_sheet.png`` and ``metrics/synth.json``.
"""
from pathlib import Path

from pipeline import atomic
from pipeline.config import Params, ParamsView, stage_params
from pipeline.data.synthetic import render_dataset, write_contact_sheet
from pipeline.tracking import stage_run

PARAMS = ("seed", "synth")
CONTACT_SHEET = Path("reports/synth_contact_sheet.png")
METRICS = Path("metrics/synth.json")


def main(params: Params | ParamsView | None = None, root: str | Path = ".") -> dict:
    """Run the stage in ``root`` (the project folder; params paths are relative to it); returns the metrics."""
    root = Path(root)
    params = stage_params(params, PARAMS, "synth", root / "params.yaml")
    out_dir = root / params.synth.out_dir
    with stage_run("synth", params) as run:
        summary = render_dataset(params.synth, out_dir, params.seed, show_progress=True)
        write_contact_sheet(out_dir, root / CONTACT_SHEET)
        atomic.write_json(root / METRICS, summary)
        run.log_metrics(summary)
        run.log_artifact(root / CONTACT_SHEET)
        run.log_artifact(root / METRICS)
    print(f"synth: {summary}")
    return summary


if __name__ == "__main__":
    main()
