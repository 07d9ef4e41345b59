#!/usr/bin/env bash
# Installs what building and testing tcmu-rbd needs on Debian 12.
# Idempotent: packages already present are not touched.
set -euo pipefail
# prometheus: its promtool checks the metrics endpoint's output (the
# metrics_endpoint test fails without it).
want=(build-essential pkg-config librbd-dev librados-dev dbus python3-gi prometheus "$@")
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q -o DPkg::Lock::Timeout=600 >/dev/null
  apt-get install -y -q -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "deps: no cargo on PATH; installing Debian's (needs Rust >= 1.87)" >&2
  apt-get install -y -q -o DPkg::Lock::Timeout=600 cargo rustc >/dev/null
fi
v=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n1.87.0\n' "$v" | sort -V | head -1)" != "1.87.0" ]; then
  echo "deps: rustc $v is too old; tcmu-rbd needs Rust 1.87 or newer" >&2
  exit 1
fi
