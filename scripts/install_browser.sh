#!/usr/bin/env bash
# Debian's chromium and chromium-driver for the review page's browser test, when missing.
# Needs root or password-less sudo; pip packages that fetch their own browser fail offline.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if ! sudo -n true 2>/dev/null; then
    echo "error: tests/test_serve_browser.py needs Debian's chromium and chromium-driver;" \
         "install them (apt-get install chromium chromium-driver) or run as root" >&2
    exit 2
  fi
  SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
