"""PVEN re-identification: model (model.py), distances (distance.py), losses (losses.py),
data feeding (data.py, sampling.py) and the training loop (train.py).

What other stages use:

* ``pipeline.reid.model.load_model(path)`` -> (PVEN in eval mode, metadata incl. ``class_vids``,
  ``variant``, ``image_size``)
* ``pipeline.reid.model.embed(model, batch)`` -> ``global`` (B, C) after the BN neck,
  ``local`` (B, 4, C), ``visibility`` (B, 4), for a batch made by
  ``pipeline.reid.data.collate`` of ``EvalTransform(image_size)`` samples
* ``pipeline.reid.distance``: ``euclidean`` (D_g), ``local_distance`` /
  ``pairwise_local_distance`` (D_l, differentiable; the evaluator uses it too)
* ``pipeline.reid.train.train(params, dist_info, ...)``
"""
