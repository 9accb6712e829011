#!/usr/bin/env bash
set -euo pipefail
echo "ok: k3s"
