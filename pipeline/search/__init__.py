"""Retrieval for new images with a trained PVEN: ``python -m pipeline.search`` (or ``pven-search``).

* ``index DIR_OR_SHARDS --out INDEX``: parse and embed a folder of images (or take the
  masked shards with their stored masks) into an embedding folder in the evaluate stage's
  format plus ``index.json`` (:mod:`.index`); ranks split the work under torchrun;
* ``query INDEX IMAGE... --top K``: parse and embed the query images and rank the index
  exactly with the PVEN distance, block by block (:func:`pipeline.evaluation.topk.nearest`),
  printing JSON; ``--png``/``--html`` draw the ranked list (:mod:`.picture`).

Both run on the torch checkpoints or on the exported ONNX graphs (``--backend``), through
one :class:`~.encoder.Encoder`.
"""
