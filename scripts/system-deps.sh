#!/usr/bin/env bash
# Installs the Debian packages meshlet's tests and benchmarks drive as real peers,
# only the ones whose commands are missing. Needs root (CI runs as root).
set -euo pipefail

# command -> Debian package
declare -A wanted=(
  [curl]=curl
  [openssl]=openssl
  [haproxy]=haproxy
  [nginx]=nginx-light
  [h2load]=nghttp2-client
  [nghttp]=nghttp2-client
  [wrk]=wrk
  [etcd]=etcd-server
  [softhsm2-util]=softhsm2
  [ip]=iproute2
  [iptables]=iptables
)

missing=()
for cmd in "${!wanted[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
    missing+=("${wanted[$cmd]}")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing Debian packages: ${missing[*]} (run as root, or install them; tests needing them are skipped)" >&2
  exit 0
fi
echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts some daemons on install; meshlet's tests start their own on loopback.
for svc in haproxy nginx etcd; do
  (service "$svc" stop >/dev/null 2>&1 || true)
done
