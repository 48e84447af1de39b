#!/usr/bin/env bash
# Build the Debian package agor-systemd_<version>_all.deb from this tree.
#
#   scripts/build-deb.sh [--out DIR] [--version VERSION] [--no-lintian]
#
# Runs on Debian 12 or 13 as root (it installs missing Build-Depends with apt) or as a user who has
# them. The tree is copied to a temporary directory (nothing is written into the repository),
# packaging/debian/ becomes debian/, and debian/changelog is written from agor_systemd.__version__,
# the one version source (pyproject.toml reads it too). --version overrides it in the copy, for an
# upgrade test's "next" package: the Python metadata, `agor-units --version` and the .deb agree.
# Then dpkg-buildpackage (dh + pybuild), and lintian, which must report no error
# (packaging/debian/agor-systemd.lintian-overrides gives the reason for each override).
# The .deb lands in DIR (default: dist/); its path is the last line printed.
set -euo pipefail
umask 022
# Debian's python3 and tools only (a pyenv or virtualenv on PATH would build against another Python)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$REPO/dist version="" lintian=1
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --no-lintian) lintian=0; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-deb: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { printf '[build-deb] %s\n' "$*" >&2; }
die() { printf 'build-deb: error: %s\n' "$*" >&2; exit 1; }

work=$(mktemp -d /tmp/agor-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
src=$work/agor-systemd
mkdir "$src"
# the tracked and new files of the tree (not build output, not .git); a plain copy without git
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) \
    | tar -C "$REPO" --null -T - -cf - | tar -C "$src" -xf -
  commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
else
  tar -C "$REPO" --exclude=.git --exclude=dist --exclude=build --exclude='*.egg-info' --exclude=__pycache__ -cf - . \
    | tar -C "$src" -xf -
  commit=unknown
fi
init=$src/agor_systemd/__init__.py
if [ -n "$version" ]; then
  [[ $version =~ ^[0-9][0-9A-Za-z.+~]*$ ]] || die "--version $version: not a Debian and PEP 440 version"
  sed -i "s/^__version__ = .*/__version__ = \"$version\"/" "$init"
fi
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$init")
[ -n "$version" ] || die "no __version__ in agor_systemd/__init__.py"

cp -a "$src/packaging/debian" "$src/debian"
maintainer=$(sed -n 's/^Maintainer: //p' "$src/debian/control")
date=$(date -R -d "@${SOURCE_DATE_EPOCH:-$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)}")
cat > "$src/debian/changelog" <<CHANGELOG
agor-systemd ($version) unstable; urgency=medium

  * Built from the agor-systemd repository, commit $commit.

 -- $maintainer  $date
CHANGELOG

cd "$src"
if ! unmet=$(dpkg-checkbuilddeps 2>&1); then
  pkgs=$(printf '%s\n' "$unmet" | sed -n 's/.*nmet build dependencies: //p' | sed 's/([^)]*)//g; s/|[^ ]*//g; s/:native//g')
  [ -n "$pkgs" ] || die "dpkg-checkbuilddeps: $unmet"
  [ "$(id -u)" -eq 0 ] || die "missing Build-Depends (install them as root): $pkgs"
  say "installing Build-Depends: $pkgs"
  [ -n "$(ls /var/lib/apt/lists/ | grep _Packages 2>/dev/null)" ] || apt-get update -q >&2
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs >&2 \
    || die "apt-get install of the Build-Depends failed"
fi
say "dpkg-buildpackage agor-systemd $version"
dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "dpkg-buildpackage failed"; }
deb=$(ls "$work"/agor-systemd_"$version"_all.deb)
if [ "$lintian" = 1 ]; then
  command -v lintian >/dev/null || { [ "$(id -u)" -eq 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends lintian >&2; } \
    || die "lintian is not installed"
  say "lintian $(basename "$deb")"
  lintian --fail-on error --info --display-info "$deb" >&2 || die "lintian reports errors (above)"
fi
mkdir -p "$out"
cp "$deb" "$out/"
echo "$out/$(basename "$deb")"
