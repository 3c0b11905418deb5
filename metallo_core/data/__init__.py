"""Datasets: the shard format, ingestion, built-in synthetic data, readers and augmentations."""
