#!/usr/bin/env bash
# Make sure headless Chromium is available for the MLflow UI test (tests/test_mlflow_ui.py).
# Idempotent: does nothing when /usr/bin/chromium exists; otherwise installs Debian's `chromium`.
set -euo pipefail

BINARY=/usr/bin/chromium

if [ -x "$BINARY" ]; then
    echo "chromium present: $("$BINARY" --version 2>/dev/null || echo "$BINARY")"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: $BINARY is missing and apt-get is not available; install Chromium so that $BINARY exists" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "error: installing chromium needs root, and sudo is not available" >&2
        exit 1
    fi
    SUDO="sudo"
fi

echo "chromium missing: running ${SUDO:+$SUDO }apt-get update"
$SUDO apt-get update
echo "installing Debian's chromium: ${SUDO:+$SUDO }apt-get install -y --no-install-recommends chromium"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

if [ ! -x "$BINARY" ]; then
    echo "error: chromium installed but $BINARY does not exist" >&2
    exit 1
fi
echo "chromium installed: $("$BINARY" --version 2>/dev/null || echo "$BINARY")"
