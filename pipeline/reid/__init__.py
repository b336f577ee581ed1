"""PVEN re-identification: model (model.py), distances (distance.py), losses (losses.py),
data feeding (data.py, sampling.py), feature extraction (embed.py) and the training loop (train.py).

What other stages use:

* ``pipeline.reid.model.load_model(path)`` -> (PVEN in eval mode, metadata incl. ``class_vids``,
  ``variant``, ``image_size``); ``MODEL_FILE`` is its name inside ``reid.out_dir``
* ``pipeline.reid.embed``: ``model_forward(model)`` and ``extract_split`` (embedding
  folders, split across ranks) / ``gather_features`` (in memory, on rank 0)
* ``pipeline.reid.distance``: ``euclidean`` (D_g), ``local_distance`` /
  ``pairwise_local_distance`` (D_l, differentiable), ``pven_distance_torch`` (any
  evaluation ``DistanceSpec``, differentiable)
* ``pipeline.reid.train.train(params, dist_info, ...)``
"""
