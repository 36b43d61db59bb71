"""``osad workload``: a program that behaves normally until told to misbehave (demos, end-to-end tests).

Its behaviour is set by a control file (``--control PATH``, re-read every 0.2 s) holding one mode:

* ``normal``: a steady mix: a little CPU, some file reads, small allocations (freed), a few
  loopback TCP messages, sleeps, every 0.1 s; every mode but ``stall`` keeps doing this and adds:
* ``cpu``: spin on the CPU;
* ``leak``: allocate and touch memory, ~``--leak-mib-s`` MiB/s, never freed;
* ``syscalls``: a tight loop of cheap system calls;
* ``forks``: start short-lived child processes, as fast as it can;
* ``io``: write and fsync a file, ~``--io-mib-s`` MiB/s;
* ``net``: send over loopback TCP, ~``--net-mib-s`` MiB/s;
* ``stall``: stop working (sleep), as a hung process would.

Example::

    echo normal > /tmp/mode; osad workload --control /tmp/mode &
    osad collect --pid $! --follow-children --output jsonl:-
    echo cpu > /tmp/mode    # now it spins
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from osad.runtime.config import Config, positive, setting

MODES = ("normal", "cpu", "leak", "syscalls", "forks", "io", "net", "stall")
MIB = 1 << 20


@dataclass(frozen=True)
class WorkloadConfig(Config):
    """a program that misbehaves on command (demos, end-to-end tests)"""

    control: str = setting("", required=True, help="file holding the mode; re-read every 0.2 s")
    leak_mib_s: float = setting(20.0, check=positive, help="leak mode: MiB per second")
    io_mib_s: float = setting(20.0, check=positive, help="io mode: MiB per second")
    net_mib_s: float = setting(20.0, check=positive, help="net mode: MiB per second")
    duration_s: float = setting(0.0, help="exit after this long (0: until killed)")
    verbose: bool = setting(False,
                            help="print each mode change to stderr (off by default: that write would show in the "
                            "process's write_bytes and syscalls at the very moment its fault starts)")


def register(sub) -> None:
    WorkloadConfig.add_command(
        sub,
        "workload",
        run,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


class _Sink:
    """A loopback TCP server in a child process that reads and discards: the other end of the network
    traffic. A separate process, as a remote peer would be, so the watched process only sends."""

    def __init__(self):
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        self.pid = os.fork()
        if self.pid == 0:  # child: serve one connection until the workload closes it (or dies)
            try:
                c, _ = srv.accept()
                while c.recv(1 << 16):
                    pass
            finally:
                os._exit(0)
        self.conn = socket.create_connection(srv.getsockname())
        srv.close()

    def close(self) -> None:
        self.conn.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _mode(path: Path, cur: str) -> str:
    try:
        m = path.read_text().strip()
    except OSError:
        return cur
    if m not in MODES:
        print(f"osad workload: unknown mode {m!r} in {path}; modes: {', '.join(MODES)}", file=sys.stderr)
        return cur
    return m


def run(args) -> int:
    cfg = WorkloadConfig.from_args(args)
    sink = _Sink()
    try:
        return _work(cfg, Path(cfg.control), sink)
    finally:
        sink.close()


def _work(cfg: WorkloadConfig, control: Path, sink: _Sink) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="osad-workload-"))
    leak: list[bytearray] = []
    payload = b"x" * 65536
    mode, last_check = _mode(control, "normal"), 0.0
    t_end = time.monotonic() + cfg.duration_s if cfg.duration_s > 0 else None
    print(f"osad workload: pid {os.getpid()}, mode {mode}", file=sys.stderr, flush=True)
    i = 0
    while t_end is None or time.monotonic() < t_end:
        now = time.monotonic()
        if now - last_check >= 0.2:
            new = _mode(control, mode)
            if new != mode:
                if cfg.verbose:  # off by default: a log line is a write the fault itself would not make
                    print(f"osad workload: mode {mode} -> {new}", file=sys.stderr, flush=True)
                mode = new
            last_check = now
        i += 1
        if mode == "stall":
            time.sleep(0.2)
            continue
        # every mode but stall keeps the normal activity and adds its fault on top (a burst, not a swap)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.004:  # ~4% of a CPU
            pass
        with open(__file__, "rb") as f:
            f.read(4096)
        buf = bytearray(256 * 1024)
        buf[::4096] = b"y" * len(buf[::4096])
        del buf
        sink.conn.sendall(payload[:2048])
        if mode == "normal":
            time.sleep(0.1)
        elif mode == "cpu":
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.2:
                pass
        elif mode == "leak":
            chunk = bytearray(int(cfg.leak_mib_s * MIB / 10))
            chunk[::4096] = b"z" * len(chunk[::4096])  # touch every page
            leak.append(chunk)
            time.sleep(0.1)
        elif mode == "syscalls":
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.2:
                os.getppid()
                os.stat(__file__)
        elif mode == "forks":
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.2:
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                os.waitpid(pid, 0)
        elif mode == "io":
            with open(tmp / "io.bin", "wb") as f:
                n = int(cfg.io_mib_s * MIB / 10)
                for _ in range(max(1, n // len(payload))):
                    f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            time.sleep(0.1)
        elif mode == "net":
            for _ in range(max(1, int(cfg.net_mib_s * MIB / 10 / len(payload)))):
                sink.conn.sendall(payload)
            time.sleep(0.1)
    return 0
