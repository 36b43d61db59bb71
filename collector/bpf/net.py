"""Family "net" (net.c): bytes sent and received on internet and Unix-domain sockets."""

from __future__ import annotations

from .family import Family


class Net(Family):
    name = "net"
    c_file = "net.c"
    counters = ("net_tx_bytes", "net_rx_bytes", "unix_tx_bytes", "unix_rx_bytes")
