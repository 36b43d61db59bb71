"""The collector: eBPF (or /proc) per-process samples, and benchmark replay, to the samples topic."""
