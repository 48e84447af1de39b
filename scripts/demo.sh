#!/usr/bin/env bash
# The "run it" command: set up this machine (idempotent), then show supervision live on an
# ephemeral systemd user manager. Run as root; extra arguments go to `agor-units demo`.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$here/setup.sh"
exec "${AGOR_PREFIX:-/opt/agor-systemd}"/venv/bin/agor-units demo "$@"
