#!/usr/bin/env bash
# Build the Python distributions: dist/agor_systemd-<version>.tar.gz and -py3-none-any.whl.
#
#   scripts/build-dist.sh [--out DIR]
#
# `python3 -m build` with Debian's python3-build and python3-setuptools (no download: the build
# runs against the installed backend, --no-isolation), from a copy of the tree (no build/ or
# *.egg-info left in it); then `twine check` of the metadata. The version is agor_systemd.__version__
# (pyproject.toml reads it). The paths of the two files are the last lines printed.
set -euo pipefail
umask 022
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$REPO/dist
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-dist: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
die() { printf 'build-dist: error: %s\n' "$*" >&2; exit 1; }
for module in build setuptools; do
  python3 -c "import $module" 2>/dev/null || die "python3-$module is not installed (apt-get install python3-build python3-setuptools twine)"
done
command -v twine >/dev/null || die "twine is not installed (apt-get install twine)"

work=$(mktemp -d /tmp/agor-dist.XXXXXX)
trap 'rm -rf "$work"' EXIT
tar -C "$REPO" --exclude=.git --exclude=dist --exclude=build --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=.pytest_cache -cf - . | tar -C "$work" -xf -
python3 -m build --no-isolation --sdist --wheel --outdir "$work/dist" "$work" >"$work/build.log" 2>&1 \
  || { tail -n 30 "$work/build.log" >&2; die "python3 -m build failed"; }
twine check --strict "$work"/dist/* >&2 || die "twine check failed"
mkdir -p "$out"
cp "$work"/dist/* "$out/"
for f in "$work"/dist/*; do echo "$out/$(basename "$f")"; done
