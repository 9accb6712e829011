#!/usr/bin/env bash
# Test fixture step: does nothing.
set -euo pipefail
echo "ok: base"
