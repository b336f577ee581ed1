"""synth stage: render the synthetic vehicle dataset (the embedded default) in the VeRi-776 layout.

    dvc repro synth                 # as part of the pipeline
    python stages/synth.py          # the same, by hand (reads ./params.yaml)

Reads params ``seed``, ``synth`` and ``data.val_ids`` (the held-out training identities get
families of their own). Writes ``synth.out_dir`` (images, name lists, label
PNGs, views.csv), ``reports/synth_contact_sheet.png`` (whole look-alike families of the
test split, one member per row), ``reports/synth.json`` (the full summary, mark
visibility included) and ``metrics/synth.json`` (the headline numbers;
``mark_visible_share``: the share of rendered train + test images showing at least one
identity mark).
"""
from pathlib import Path

from pipeline import atomic, cli
from pipeline.config import Params, ParamsView, stage_params
from pipeline.data.synthetic import identities, render_dataset, write_contact_sheet
from pipeline.tracking import headline, stage_run, without_timings

PARAMS = ("seed", "synth", "data.val_ids")
CONTACT_SHEET = Path("reports/synth_contact_sheet.png")
METRICS, REPORT = Path("metrics/synth.json"), Path("reports/synth.json")
HEADLINE = {"images": "images_rendered", "train_ids": "splits.train.identities",
            "test_ids": "splits.query.identities", "images_per_s": "images_per_s",
            "mark_visible_share": "marks.all.any"}
SHEET_ROWS = 12   # identities on the contact sheet: whole test families, up to this many rows


def main(params: Params | ParamsView | None = None, root: str | Path = ".") -> dict:
    """Run the stage in ``root`` (the project folder; params paths are relative to it); returns the metrics."""
    root = Path(root)
    params = stage_params(params, PARAMS, "synth", root / "params.yaml")
    out_dir = root / params.synth.out_dir
    with stage_run("synth", params) as run:
        summary = render_dataset(params.synth, out_dir, params.seed, show_progress=True,
                                 val_ids=params.data.val_ids)
        write_contact_sheet(out_dir, root / CONTACT_SHEET, n_ids=SHEET_ROWS,
                            identities=identities(params.synth, params.seed, params.data.val_ids))
        atomic.write_json(root / REPORT, without_timings(summary))
        atomic.write_json(root / METRICS, headline(summary, HEADLINE))
        run.log_metrics(summary)
        for path in (CONTACT_SHEET, METRICS, REPORT):
            run.log_artifact(root / path)
    print(f"synth: {summary}")
    return summary


if __name__ == "__main__":
    cli.run(main)
