#!/usr/bin/env bash
# Make a Docker engine reachable on a Debian machine without systemd (CI, a dev VM): install Debian's
# docker.io (daemon + a BuildKit-capable client), debootstrap (the local base image) and docker-registry
# (the loopback registry tests/test_image_registry.py pushes to) when missing, then start dockerd by hand
# when no daemon answers. Needs root for that; without root and without a daemon it only says so, and
# the container tests skip with that reason.
set -euo pipefail
if [ "$(id -u)" = 0 ]; then
  if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1 \
    || [ ! -x /usr/bin/docker ] || [ ! -x /usr/bin/docker-registry ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap docker-registry >/dev/null
  fi
fi
if docker info >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "images/docker_engine.sh: no Docker daemon reachable and not root; container tests will skip" >&2
  exit 0
fi
log=${DOCKERD_LOG:-/var/log/dockerd.log}
nohup dockerd >"$log" 2>&1 &
for _ in $(seq 60); do
  if docker info >/dev/null 2>&1; then
    echo "images/docker_engine.sh: dockerd started (log: $log)"
    exit 0
  fi
  sleep 1
done
echo "images/docker_engine.sh: dockerd did not start; see $log" >&2
exit 1
