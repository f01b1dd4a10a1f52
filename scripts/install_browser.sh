#!/usr/bin/env bash
# Headless Chromium for the e2e tests: Debian's chromium package plus Playwright for Python driving it.
# Idempotent. Never runs `playwright install` (no browser downloads from outside Debian).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1 || [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  # Wait for another apt (an unattended upgrade, a second checkout's setup) rather than fail on its lock.
  APT_WAIT=(-o DPkg::Lock::Timeout=600)
  $SUDO apt-get "${APT_WAIT[@]}" update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${APT_WAIT[@]}" install -y --no-install-recommends chromium
fi

PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$PYTHON" -c "import playwright" >/dev/null 2>&1; then
  "$PYTHON" -m pip install "playwright>=1.45"
fi
/usr/bin/chromium --version
"$PYTHON" -c "import playwright; from importlib.metadata import version; print('playwright', version('playwright'))"
