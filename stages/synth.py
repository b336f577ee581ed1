"""synth stage: render the synthetic vehicle dataset (the embedded default) in the VeRi-776 layout.

    dvc repro synth                 # as part of the pipeline
    python stages/synth.py          # the same, by hand (reads ./params.yaml)

Reads params ``seed`` and ``synth``. Writes ``synth.out_dir`` (images, name lists, label
PNGs, views.csv), ``reports/synth_contact_sheet.png`` and ``metrics/synth.json``.
"""
from pathlib import Path

from pipeline import atomic
from pipeline.config import load_params
from pipeline.data.synthetic import render_dataset, write_contact_sheet
from pipeline.tracking import stage_run

CONTACT_SHEET = Path("reports/synth_contact_sheet.png")
METRICS = Path("metrics/synth.json")


def main() -> None:
    params = load_params("params.yaml")
    out_dir = Path(params.synth.out_dir)
    with stage_run("synth", params, ["seed", "synth"]) as run:
        summary = render_dataset(params.synth, out_dir, params.seed)
        CONTACT_SHEET.parent.mkdir(parents=True, exist_ok=True)
        write_contact_sheet(out_dir, CONTACT_SHEET)
        atomic.write_json(METRICS, summary)
        run.log_metrics(summary)
        run.log_artifact(CONTACT_SHEET)
        run.log_artifact(METRICS)
    print(f"synth: {summary}")


if __name__ == "__main__":
    main()
