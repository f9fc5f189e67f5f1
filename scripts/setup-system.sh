#!/usr/bin/env bash
# Debian packages with data that trajflow reads from disk (needs root). Tests that need them skip
# cleanly where they are missing.
set -euo pipefail
packages="dataset-fashion-mnist fonts-noto-color-emoji"
missing=$(for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "install as root: apt-get install -y $missing" >&2
  exit 0
fi
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
