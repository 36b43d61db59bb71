"""The featurizer: per-entity windows and MSCRED multi-scale signature matrices."""
