"""The detector: scorers (compressed sensing, MSCRED, baselines), the scoring engine and service, training and evaluation."""
