"""Family "block" (block.c): bytes submitted to block devices, read and written, by the submitting process."""

from __future__ import annotations

from .family import Family


class Block(Family):
    name = "block"
    c_file = "block.c"
    counters = ("block_read_bytes", "block_write_bytes")
