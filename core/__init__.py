"""Pure algorithms shared by services and tools (no Kafka, no I/O beyond reading data files).

* ``core.signature``: MSCRED signature matrices and min-max scaling (the reference, vectorised form).
* ``core.datasets``: readers for the benchmark layouts (SMD/ASD and JumpStarter).
"""
