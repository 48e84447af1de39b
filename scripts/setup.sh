#!/usr/bin/env bash
# Set up a machine for agor-systemd development and its integration tests.
#
# Run as root on Debian 12 (bookworm) or 13 (trixie). Idempotent: a re-run skips what is already
# in place and only reinstalls the project into the virtualenv (so it has the current code).
#
# What it does:
#   1. apt: the build/runtime packages (skipped when all are installed already).
#   2. systemd 254 from bookworm-backports, downloaded with a *private* apt configuration (the
#      system's apt sources, lists and caches are not touched) and extracted - not installed - into
#      /opt/agor-systemd/systemd-254. The test bed runs it side by side with the host's systemd.
#   3. A virtualenv at /opt/agor-systemd/venv built from Debian's /usr/bin/python3 (unprivileged test
#      users must be able to execute it), with this project and its test extras installed (pytest,
#      and the linters tests/test_linters.py runs: ruff, mypy; the [otel] extra, opentelemetry-proto
#      for the telemetry tests' OTLP receiver and PyYAML for the Tempo stack's static check).
#
# Environment knobs:
#   AGOR_PREFIX       install prefix (default /opt/agor-systemd)
#   AGOR_SKIP_SD254=1 do not fetch the private systemd 254
set -euo pipefail
umask 022

PREFIX=${AGOR_PREFIX:-/opt/agor-systemd}
SD254=$PREFIX/systemd-254
SD254_MARKER=$SD254/.agor-extracted
VENV=$PREFIX/venv
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export DEBIAN_FRONTEND=noninteractive

APT_PACKAGES=(
  ca-certificates
  systemd dbus dbus-user-session
  util-linux          # runuser, setpriv, nsenter, unshare, mountpoint
  passwd              # useradd
  libsystemd-dev pkg-config gcc   # build pystemd
  python3 python3-venv python3-dev
  nodejs              # the README's example sidecar is a node runner: tests run it as written
  sqlite3             # the sqlite3 CLI: bench/walcheck.py compares agor-walcheck against it
  git                 # tests/integration/test_hardening.py: an agent's git commit inside the hardened unit
  # packaging: scripts/build-deb.sh (packaging/debian/control's Build-Depends), scripts/build-dist.sh,
  # and tests/packaging (clean Debian roots, lintian, pipx, man pages)
  build-essential debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-click
  python3-build twine lintian mmdebstrap pipx man-db
)

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || printf "[setup] FAILED (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' EXIT

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and writes to $PREFIX)"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian 12/13 only"
[ -f "$REPO/pyproject.toml" ] || die "cannot find the project at $REPO (no pyproject.toml)"

# ---------------------------------------------------------------------------------------------
# 1. Debian packages
# ---------------------------------------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  st=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
  [ "${st:0:2}" = "ii" ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  say "apt: all ${#APT_PACKAGES[@]} packages already installed, skipping"
else
  say "apt: installing ${missing[*]}"
  apt-get update -q || die "apt-get update failed"
  apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}" || die "apt-get install failed"
fi
for tool in runuser setpriv nsenter unshare mountpoint useradd /usr/bin/python3 /lib/systemd/systemd; do
  command -v "$tool" >/dev/null || [ -x "$tool" ] || die "required tool $tool is missing after the apt step"
done

# ---------------------------------------------------------------------------------------------
# 2. Private systemd 254 (bookworm-backports), extracted only
# ---------------------------------------------------------------------------------------------
sd254_libdir() {  # the directory holding libsystemd-shared-254.so (multiarch-independent)
  local f
  for f in "$SD254"/usr/lib/*/systemd/libsystemd-shared-*.so "$SD254"/lib/*/systemd/libsystemd-shared-*.so; do
    [ -e "$f" ] && { dirname "$f"; return 0; }
  done
  return 1
}
sd254_version() {
  local libdir; libdir=$(sd254_libdir) || return 1
  LD_LIBRARY_PATH=$libdir "$SD254/lib/systemd/systemd" --version | head -n1
}

# Shared libraries the 254 binaries link against, by soname -> Debian package. On Debian 13 the
# host's systemd dlopen()s some of them, so they may not be installed (seen: libkmod, libgcrypt,
# libip4tc on a minimal trixie).
declare -A SONAME_PKG=(
  [libkmod.so.2]=libkmod2 [libgcrypt.so.20]=libgcrypt20 [libip4tc.so.2]=libip4tc2
  [libseccomp.so.2]=libseccomp2 [libapparmor.so.1]=libapparmor1 [libcryptsetup.so.12]=libcryptsetup12
  [libaudit.so.1]=libaudit1 [libpam.so.0]=libpam0g [libacl.so.1]=libacl1 [libblkid.so.1]=libblkid1
  [libmount.so.1]=libmount1 [libcap.so.2]=libcap2 [libcrypt.so.1]=libcrypt1 [liblz4.so.1]=liblz4-1
  [liblzma.so.5]=liblzma5 [libzstd.so.1]=libzstd1 [libselinux.so.1]=libselinux1
  [libgpg-error.so.0]=libgpg-error0 [libpcre2-8.so.0]=libpcre2-8-0
)
sd254_missing_sonames() {
  local libdir f; libdir=$(sd254_libdir) || return 0
  for f in "$SD254"/lib/systemd/systemd "$SD254"/bin/systemctl "$SD254"/bin/journalctl \
           "$SD254"/bin/systemd-notify "$SD254"/usr/bin/systemd-analyze "$SD254"/usr/bin/systemd-run \
           "$SD254"/usr/bin/busctl "$libdir"/*.so; do
    [ -e "$f" ] && LD_LIBRARY_PATH=$libdir ldd "$f" 2>/dev/null
  done | awk '$2 == "=>" && $3 == "not" { print $1 }' | sort -u
}
sd254_install_missing_libs() {
  local missing pkgs=() so
  missing=$(sd254_missing_sonames)
  [ -n "$missing" ] || return 0
  for so in $missing; do
    [ -n "${SONAME_PKG[$so]:-}" ] || die "systemd 254 needs $so and this script does not know its package"
    pkgs+=("${SONAME_PKG[$so]}")
  done
  say "systemd 254: installing libraries it links against: ${pkgs[*]}"
  apt-get update -q >/dev/null || die "apt-get update failed"
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" || die "apt-get install ${pkgs[*]} failed"
}

mirror_uri() {  # the Debian (non-security) mirror this machine's apt configuration names
  local uri="" f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && [ -z "$uri" ] || continue
    uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] && [ -z "$uri" ] || continue
    uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { if ($i !~ /security/) { print $i; exit } break } }' "$f")
  done
  [ -n "$uri" ] || die "no Debian mirror in /etc/apt/sources.list or /etc/apt/sources.list.d: cannot fetch systemd 254"
  echo "$uri"
}

if [ -n "${AGOR_SKIP_SD254:-}" ]; then
  say "systemd 254: skipped (AGOR_SKIP_SD254 set)"
elif [ -f "$SD254_MARKER" ] && { sd254_install_missing_libs; v=$(sd254_version 2>/dev/null); } \
     && [[ $v == "systemd 254 "* ]]; then
  say "systemd 254: already extracted in $SD254 ($v)"
else
  [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] \
    || die "/usr/share/keyrings/debian-archive-keyring.gpg missing (apt-get install debian-archive-keyring)"
  mirror=$(mirror_uri)
  say "systemd 254: downloading from $mirror bookworm-backports (private apt config, system apt untouched)"
  work=$(mktemp -d /tmp/agor-sd254.XXXXXX)
  chmod 755 "$work"   # apt downloads as the _apt user
  mkdir -p "$work/etc/sources.list.d" "$work/etc/preferences.d" "$work/lists/partial" \
           "$work/cache/archives/partial" "$work/debs" "$work/root"
  : > "$work/status"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm-backports main" \
    > "$work/etc/sources.list"
  # apt drops privileges to _apt for downloads
  chown -R _apt "$work/lists" "$work/cache" "$work/debs" 2>/dev/null || true
  apt_opts=(
    -o "Dir::Etc::SourceList=$work/etc/sources.list"
    -o "Dir::Etc::SourceParts=$work/etc/sources.list.d"
    -o "Dir::Etc::Preferences=$work/etc/preferences"
    -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::State::status=$work/status"
    -o "Dir::Cache=$work/cache"
    -o "APT::Get::List-Cleanup=false"
    -q
  )
  apt-get "${apt_opts[@]}" update || die "apt-get update of bookworm-backports (private config) failed"
  ( cd "$work/debs" && apt-get "${apt_opts[@]}" -t bookworm-backports download \
      systemd/bookworm-backports libsystemd-shared/bookworm-backports libsystemd0/bookworm-backports ) \
    || die "apt-get download of systemd 254 from bookworm-backports failed"
  for deb in "$work"/debs/*.deb; do
    say "  extracting $(basename "$deb")"
    dpkg -x "$deb" "$work/root"
  done
  rm -rf "$SD254"
  mkdir -p "$PREFIX"
  mv "$work/root" "$SD254"
  rm -rf "$work"
  sd254_install_missing_libs
  v=$(sd254_version) || die "extracted systemd 254 does not run: $(sd254_version 2>&1 || true)"
  [[ $v == "systemd 254 "* ]] || die "extracted systemd reports '$v', expected systemd 254"
  echo "$v" > "$SD254_MARKER"
  say "systemd 254: extracted to $SD254 ($v)"
fi

# ---------------------------------------------------------------------------------------------
# 3. Virtualenv from Debian's python3, with the project installed (non-editable)
# ---------------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  say "venv: creating $VENV from /usr/bin/python3 ($(/usr/bin/python3 --version))"
  rm -rf "$VENV"
  mkdir -p "$PREFIX"
  /usr/bin/python3 -m venv "$VENV" || die "python3 -m venv failed (is python3-venv installed?)"
else
  say "venv: $VENV exists ($("$VENV/bin/python" --version))"
fi

# Build from a copy of the work tree, so pip/setuptools leave no build/ or *.egg-info in the repo.
src=$(mktemp -d /tmp/agor-src.XXXXXX)
tar -C "$REPO" --exclude=.git --exclude=build --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=.pytest_cache -cf - . | tar -C "$src" -xf -
if "$VENV/bin/python" -m pip show -q agor-systemd >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip uninstall -y -q agor-systemd >/dev/null
fi
say "venv: pip install $REPO[test,relay] (non-editable)"
"$VENV/bin/python" -m pip install -q "$src[test,relay]" || { rm -rf "$src"; die "pip install of the project failed"; }
rm -rf "$src"
"$VENV/bin/python" -c 'import agor_systemd, click, pystemd, pytest, xdist, ruff, mypy, opentelemetry.sdk, opentelemetry.proto' \
  || die "the venv is missing a module after pip install"

chmod -R a+rX "$PREFIX"
builds="host $(/lib/systemd/systemd --version | awk 'NR == 1 {print $2}')"
[ -f "$SD254_MARKER" ] && builds="$builds, private 254 in $SD254"
say "done: venv $VENV ($("$VENV/bin/python" -m pip show agor-systemd 2>/dev/null | awk '/^Version:/ {print "agor-systemd " $2}')); systemd builds: $builds"
