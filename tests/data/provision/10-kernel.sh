#!/usr/bin/env bash
# Test fixture step that asks for a reboot.
# appliance: reboot-after
set -euo pipefail
echo "ok: kernel"
