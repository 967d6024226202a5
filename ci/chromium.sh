#!/usr/bin/env bash
# Install headless Chromium (Debian package) for tests/test_html_report.py; idempotent.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "[chromium] $(chromium --version 2>/dev/null || echo installed)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || {
  apt-get update -qq >/dev/null
  apt-get install -y --no-install-recommends chromium >/dev/null
}
echo "[chromium] $(chromium --version 2>/dev/null)"
