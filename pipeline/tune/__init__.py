"""Ray Tune sweep of the training params (the tune stage; params section ``tune``).

``space``: the search space and what a sweep needs from the cluster; ``trial``: one trial, a
Ray Train run of :func:`pipeline.reid.train.train` with a child MLflow run; ``sweep``: the
driver (Tuner, resume, results, outputs, the parent MLflow run).
"""
