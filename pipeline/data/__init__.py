"""Data: dataset readers, the synthetic renderer, WebDataset shards."""
