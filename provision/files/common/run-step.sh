#!/bin/bash
# run-step.sh SCRIPT: run one provisioning step and, when it succeeds, leave its step marker.
#
# Both runners start every step through this wrapper: the Paramiko runner (`invoke provision`,
# `invoke build-ova`) and the shell provisioners of the rendered Vagrantfile (`vagrant up`).
# So there is one place that writes markers on the guest, and the host computes each marker's
# content once (appliance/steps.py, StepInputs): a VM provisioned by `vagrant up` is seen as
# done, input for input, by `invoke provision`.
#
# Inputs (environment, removed before SCRIPT runs, so the step sees only its own variables):
#   APPLIANCE_STEP_MARKER       the marker as one JSON object (step, digest, inputs, format);
#                               empty for the final step, which leaves no marker
#   APPLIANCE_STEP_MARKER_FILE  where the marker goes (<state dir>/<step>.done)
# The wrapper adds "finished" (UTC) and "seconds" to the object. The step's own marker is
# removed before it runs, so a step that fails or is interrupted is never seen as done.
set -euo pipefail

script=${1:?usage: run-step.sh SCRIPT}
marker=${APPLIANCE_STEP_MARKER:-}
marker_file=${APPLIANCE_STEP_MARKER_FILE:-}
unset APPLIANCE_STEP_MARKER APPLIANCE_STEP_MARKER_FILE

if [[ -n "$marker" ]]; then
    [[ "$marker_file" == /*.done ]] || {
        echo "error: APPLIANCE_STEP_MARKER_FILE must be an absolute path ending in .done, not '$marker_file'" >&2
        exit 2
    }
    [[ "$marker" == \{*\} ]] || {
        echo "error: APPLIANCE_STEP_MARKER is not a JSON object" >&2
        exit 2
    }
    rm -f -- "$marker_file"
fi

started=$(date +%s%N)
status=0
bash "$script" || status=$?
if ((status != 0)); then
    exit "$status"
fi

if [[ -n "$marker" ]]; then
    tenths=$((($(date +%s%N) - started) / 100000000))
    finished=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)
    install -d -m 0755 -- "$(dirname -- "$marker_file")"
    printf '%s,"finished":"%s","seconds":%d.%d}\n' "${marker%\}}" "$finished" $((tenths / 10)) $((tenths % 10)) \
        >"$marker_file.tmp"
    mv -f -- "$marker_file.tmp" "$marker_file"
fi
