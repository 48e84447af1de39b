#!/usr/bin/env bash
# The test command: set up this machine (idempotent), then run the whole suite.
# Run as root on Debian 12 or 13; extra arguments go to pytest (e.g. -k health, -x).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$here/setup.sh"
cd "$here/.."
# Two workers: the integration tests mostly wait on timers, and each worker runs its own
# user managers (one per systemd build), so the two long schedule tests run side by side.
exec "${AGOR_PREFIX:-/opt/agor-systemd}"/venv/bin/python -m pytest -n 2 -p no:cacheprovider "$@"
