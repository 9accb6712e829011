#!/usr/bin/env bash
# Test fixture: the final step.
# appliance: final
set -euo pipefail
echo "ok: seal"
