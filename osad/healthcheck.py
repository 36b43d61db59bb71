"""The images' healthcheck: ``python -m osad.healthcheck`` exits 0 when this container's service answers
``/healthz`` with 200, else 1 (with the reason on stderr).

The port is the one the service wrote to ``$OSAD_METRICS_PORT_FILE`` (it may have moved up from the
configured port when replicas share one host network, see ``--metrics-port-span``), else
``$OSAD_METRICS_PORT``. So a service given another port stays healthy, and a replica never reports a
neighbour's health.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def served_port(env=os.environ) -> int:
    f = env.get("OSAD_METRICS_PORT_FILE", "")
    if f and Path(f).is_file():
        text = Path(f).read_text().strip()
        if text.isdigit():
            return int(text)
    port = env.get("OSAD_METRICS_PORT", "")
    if not port.isdigit() or int(port) == 0:
        raise ValueError("no metrics port: set OSAD_METRICS_PORT (the service serves /healthz there)")
    if f:  # configured to write the file but has not (yet): still starting, or the port failed to bind
        raise ValueError(f"{f} not written yet: the service has not started serving /healthz")
    return int(port)


def check(timeout_s: float = 2.0) -> tuple[bool, str]:
    try:
        port = served_port()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout_s) as r:
            return r.status == 200, f"port {port}: HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return False, f"unhealthy: HTTP {e.code} {e.read()[:300].decode(errors='replace')}"
    except (OSError, ValueError) as e:
        return False, f"unhealthy: {e}"


def main() -> int:
    ok, why = check()
    print(why, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
