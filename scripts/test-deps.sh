#!/usr/bin/env bash
# What make test needs besides Go: redis-server (the rateLimit tests start real Redis servers,
# Sentinels and Clusters), supervisord (the container's process manager, tested as shipped),
# promtool (checks the metrics and the Prometheus rules) and a C compiler (the race detector
# needs cgo). As root on Debian or Ubuntu, the missing ones are installed with apt-get;
# elsewhere this says in one line what to install and exits 1.
set -euo pipefail

need=() # Debian packages
missing=() # what is missing, as a person would look for it
cc=$("${GO:-go}" env CC 2>/dev/null || true)
cc=${cc:-gcc}
command -v redis-server >/dev/null || { need+=(redis-server); missing+=(redis-server); }
command -v supervisord >/dev/null || { need+=(supervisor); missing+=("supervisord (Debian: supervisor)"); }
command -v promtool >/dev/null || { need+=(prometheus); missing+=("promtool (Debian: prometheus)"); }
command -v "${cc%% *}" >/dev/null || { need+=(gcc libc6-dev); missing+=("a C compiler for go test -race (Debian: gcc)"); }
[ "${#need[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  msg=$(printf '%s, ' "${missing[@]}")
  echo "make test needs ${msg%, }: install them (as root on Debian, make test installs them itself) and run make test again" >&2
  exit 1
fi

echo "make test: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The Debian packages start their services on install; the tests start their own.
for svc in redis-server supervisor prometheus; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done
