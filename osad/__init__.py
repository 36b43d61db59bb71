"""osad: per-process anomaly detection for Linux. See README.md."""

__version__ = "0.1.0"
