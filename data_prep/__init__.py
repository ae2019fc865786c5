"""Dataset preparation: ImageNet -> WebDataset shards, pre-tokenization, demo data."""
