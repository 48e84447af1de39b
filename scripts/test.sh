#!/usr/bin/env bash
# The test command: set up this machine (idempotent), then run the whole suite.
# Run as root on Debian 12 or 13; extra arguments go to pytest (e.g. -k health, -x).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$here/setup.sh"
cd "$here/.."
pytest=("${AGOR_PREFIX:-/opt/agor-systemd}/venv/bin/python" -m pytest -n 2 -p no:cacheprovider)
# Two workers: the integration tests mostly wait on timers, and each worker runs its own
# user managers (one per systemd build), so the two long schedule tests run side by side.
for arg in "$@"; do
  case $arg in -m|-m*) exec "${pytest[@]}" "$@" ;; esac  # the caller selects by marker
done
# The packaging tests (tests/packaging: package builds, Debian roots made by mmdebstrap) run after
# the rest: their CPU and disk load would make the supervision tests' restart timing late.
status=0
"${pytest[@]}" -m "not packaging" "$@" || status=$?
packaging=0
"${pytest[@]}" -m packaging "$@" || packaging=$?
[ "$packaging" -eq 5 ] && packaging=0  # 5: the arguments selected no packaging test
[ "$status" -ne 0 ] && exit "$status"
exit "$packaging"
