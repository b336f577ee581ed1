"""Drivers that run the pipeline several times and compare the runs (DVC experiments, MLflow).

``python -m pipeline.experiments.ablations``: the trained ablations with paired intervals.
Nothing in the stages imports this package; it sits above them.
"""
