#!/usr/bin/env bash
# Build osad's images on a machine that reaches no image registry (this project's CI and sandboxes), with
# the engine started if nothing runs it yet. Idempotent: quick when everything exists.
#
#   scripts/docker-images.sh                 # engine, base image, then `docker-compose build` of every service
#   scripts/docker-images.sh --base-only     # only the engine and the base image
#
# 1. Starts dockerd when `docker info` fails (root only), and waits for it.
# 2. Makes the image the Dockerfile starts FROM, debian:bookworm-slim, when it is missing: debootstrap
#    (minbase, Debian 12, the apt mirror this machine uses), imported with `docker import`. Two local
#    adaptations go into that base image only, so the project's Dockerfile stays what a real host builds:
#    - this machine's CA bundle at /etc/host-ca.pem, with PIP_CERT pointing at it (HTTPS may pass a proxy
#      whose CA only the host knows; Debian's ca-certificates would rewrite /etc/ssl/certs);
#    - PIP_FIND_LINKS=http://127.0.0.1:$OSAD_WHEELS_PORT/: pip's local wheel folder (it holds the CPU build
#      of torch where PyTorch's own index is out of reach), served over loopback during builds by step 3.
# 3. Builds with host networking (downloads in RUN steps), serving the wheel folder meanwhile:
#    `docker-compose -f docker-compose.yml -f tests/compose/docker-compose.test.yml build`, whose override
#    adds the test broker image (tests/compose/broker.Dockerfile) and TORCH_CPU_INDEX="" (pip's find-links).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '[docker-images] %s\n' "$*"; }
BASE=debian:bookworm-slim
PORT=${OSAD_WHEELS_PORT:-38765}

start_engine() {
  if docker info >/dev/null 2>&1; then return 0; fi
  command -v dockerd >/dev/null || { say "ERROR: no Docker engine (install docker.io: scripts/setup.sh does)"; exit 1; }
  [ "$(id -u)" = 0 ] || { say "ERROR: the Docker engine is not running and only root can start it (sudo dockerd &)"; exit 1; }
  say "starting dockerd (log: /var/log/osad-dockerd.log)"
  nohup dockerd >/var/log/osad-dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  say "ERROR: dockerd did not answer within 60 s; see /var/log/osad-dockerd.log"; exit 1
}

find_links() {  # the host pip's local wheel folder, if any
  local d=${PIP_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}
  [ -n "$d" ] && [ -d "$d" ] && echo "$d"
}

make_base() {
  if docker image inspect "$BASE" >/dev/null 2>&1; then say "$BASE exists"; return 0; fi
  command -v debootstrap >/dev/null || { say "ERROR: debootstrap is missing (apt-get install debootstrap)"; exit 1; }
  local mirror; mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  local root; root=$(mktemp -d /tmp/osad-rootfs.XXXXXX)
  say "making $BASE with debootstrap from $mirror (about a minute)"
  debootstrap --variant=minbase bookworm "$root" "$mirror" >/tmp/osad-debootstrap.log 2>&1 \
    || { say "ERROR: debootstrap failed; see /tmp/osad-debootstrap.log"; rm -rf "$root"; exit 1; }
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/host-ca.pem"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  local changes=(--change 'ENV PIP_CERT=/etc/host-ca.pem' --change 'CMD ["bash"]')
  [ -n "$(find_links)" ] && changes+=(--change "ENV PIP_FIND_LINKS=http://127.0.0.1:$PORT/")
  tar -C "$root" -c . | docker import "${changes[@]}" - "$BASE" >/dev/null
  rm -rf "$root"
  say "$BASE made ($(docker image inspect -f '{{.Size}}' "$BASE" | awk '{printf "%.0f MB", $1/1e6}'))"
}

serve_wheels() {
  local d; d=$(find_links) || return 0
  python3 -m http.server "$PORT" --bind 127.0.0.1 --directory "$d" >/dev/null 2>&1 &
  WHEELS_PID=$!
  trap 'kill $WHEELS_PID 2>/dev/null || true' EXIT
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0; sleep 0.1; done
  say "WARNING: could not serve $d on 127.0.0.1:$PORT; pip will use its indexes only"
}

start_engine
make_base
[ "${1:-}" = --base-only ] && exit 0
serve_wheels
say "building every image (docker-compose build, host networking)"
t0=$(date +%s)
docker-compose -f docker-compose.yml -f tests/compose/docker-compose.test.yml build
say "built in $(( $(date +%s) - t0 )) s:"
docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^osad' | sed 's/^/  /' || true
