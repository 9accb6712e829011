#!/usr/bin/env bash
# Test fixture step: reads three settings.
# appliance: env=K3S_VERSION,K3S_NODE_IP
# appliance: env=K3S_EXTRA_ARGS
set -euo pipefail
echo "ok: k3s $K3S_VERSION on $K3S_NODE_IP ($K3S_EXTRA_ARGS)"
