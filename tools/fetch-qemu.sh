#!/bin/bash
# fetch-qemu.sh [DEST] -- unpack QEMU 10.0 from Debian 12's bookworm-backports into
# DEST (default: <repo>/.qemu) without installing anything system-wide, and write the
# wrapper DEST/qemu-10.0, which runs that binary with its own firmware (-L) and modules.
#
#   tools/fetch-qemu.sh && .qemu/qemu-10.0 -M pc -nodefaults -nographic -display none ...
#
# apt runs with a private sources list, state and cache under DEST/apt, against the
# mirror that this machine's apt already uses for bookworm. Its resolver, run against the
# system's dpkg status, names what must be fetched: the three QEMU packages, SeaBIOS
# from backports, and any library the system lacks. Every package is unpacked with `dpkg -x`
# into DEST/10.0; libraries found there are put on LD_LIBRARY_PATH by the wrapper.
#
# Prints the wrapper's path on success. Exits 0 with a one-line "skipped" message when
# it cannot apply (not root, not Debian 12, no apt source for bookworm, offline), so
# `make report` can call it unconditionally. Exits 1 only when the unpacked QEMU does
# not run. Does nothing when DEST/qemu-10.0 already runs.
set -euo pipefail

series=10.0
suite=bookworm-backports
# QEMU 10.0 wants a newer SeaBIOS than bookworm's: take it from backports too.
packages=(qemu-system-x86 qemu-system-common qemu-system-data seabios)

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-$repo/.qemu}
wrapper=$dest/qemu-$series

skip() { echo "fetch-qemu: skipped: $*"; exit 0; }
fail() { echo "fetch-qemu: error: $*" >&2; exit 1; }

if [ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1; then
    echo "$wrapper"
    exit 0
fi

[ "$(id -u)" = 0 ] || skip "not root (QEMU $series is only fetched as root on Debian 12)"
os_id=; os_version=
if [ -r /etc/os-release ]; then
    os_id=$(. /etc/os-release && echo "${ID:-}")
    os_version=$(. /etc/os-release && echo "${VERSION_ID:-}")
fi
[ "$os_id" = debian ] && [ "$os_version" = 12 ] || skip "not Debian 12 (found '${os_id:-?} ${os_version:-?}')"
for tool in apt-get dpkg dpkg-deb ldd; do
    command -v "$tool" >/dev/null || skip "$tool not found"
done
[ "$(dpkg --print-architecture)" = amd64 ] || skip "not amd64"

# The Debian mirror this machine's apt uses for bookworm (no host is written here).
mirror=$(apt-get indextargets --format '$(REPO_URI)' 'Release: bookworm' 'Created-By: Packages' 2>/dev/null | head -n1)
[ -n "$mirror" ] || skip "apt has no source for Debian bookworm"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || skip "$keyring not found"

mkdir -p "$dest"
# The folder is a local cache, never part of the repository.
[ -e "$dest/.gitignore" ] || echo '*' > "$dest/.gitignore"
aptdir=$dest/apt
mkdir -p "$aptdir/state/lists/partial" "$aptdir/cache/archives/partial" "$aptdir/empty"
# bookworm too: the resolver needs it for libraries that the system lacks.
cat > "$aptdir/sources.list" <<EOF
deb [signed-by=$keyring] $mirror $suite main
deb [signed-by=$keyring] $mirror bookworm main
EOF
apt_private=(
    -o "Dir::Etc::SourceList=$aptdir/sources.list"
    -o "Dir::Etc::SourceParts=$aptdir/empty"
    -o "Dir::Etc::Preferences=$aptdir/empty/none"
    -o "Dir::Etc::PreferencesParts=$aptdir/empty"
    -o "Dir::State=$aptdir/state"
    -o "Dir::Cache=$aptdir/cache"
    -o "APT::Sandbox::User=root"
    -o "Debug::NoLocking=1"
)
# Extra apt options, e.g. FETCH_QEMU_APT_OPTS='-o Acquire::http::Proxy=...'.
# shellcheck disable=SC2206
apt_private+=(${FETCH_QEMU_APT_OPTS:-})
log=$aptdir/apt.log
: > "$log"

if ! apt-get "${apt_private[@]}" -q update >>"$log" 2>&1 \
        || grep -q '^[WE]: Failed to fetch' "$log"; then
    skip "offline or mirror unreachable (apt-get update failed; see $log)"
fi

# What the system lacks for qemu-system-x86 from backports. --print-uris only prints;
# it reads the system's dpkg status and changes nothing.
targets=()
for p in "${packages[@]}"; do targets+=("$p/$suite"); done
if ! uris=$(apt-get "${apt_private[@]}" -qq --no-install-recommends --print-uris install "${targets[@]}" 2>>"$log"); then
    # The resolver can fail on a system with broken packages: fall back to the four.
    echo "fetch-qemu: resolver failed (see $log); fetching only ${packages[*]}" >&2
    uris=
fi
# Each line: 'URI' name_version_arch.deb size [hash]; the epoch's ':' is written %3a.
pins=$(printf '%s\n' "$uris" | awk 'NF >= 2 { print $2 }' | sed -n 's/^\([^_]*\)_\([^_]*\)_[^_]*\.deb$/\1=\2/p' | sed 's/%3a/:/g' | sort -u)
dl=()
for p in "${packages[@]}"; do
    printf '%s\n' "$pins" | grep -q "^$p=" || dl+=("$p/$suite")
done
for pin in $pins; do dl+=("$pin"); done

debs=$aptdir/debs
rm -rf "$debs" && mkdir -p "$debs"
if ! (cd "$debs" && apt-get "${apt_private[@]}" -q download "${dl[@]}" >>"$log" 2>&1); then
    skip "could not download ${dl[*]} (see $log)"
fi

stage=$dest/$series.tmp
rm -rf "$stage" && mkdir -p "$stage"
for deb in "$debs"/*.deb; do dpkg -x "$deb" "$stage"; done
binary=$stage/usr/bin/qemu-system-x86_64
[ -x "$binary" ] || fail "no usr/bin/qemu-system-x86_64 in the unpacked packages"

# Libraries shipped by the unpacked packages (a lib the system lacks, or a newer one).
libdirs=()
for d in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu; do
    if compgen -G "$stage/$d/lib*.so*" >/dev/null; then libdirs+=("$d"); fi
done
ldpath=
for d in "${libdirs[@]}"; do ldpath=${ldpath:+$ldpath:}$stage/$d; done
missing=$(LD_LIBRARY_PATH=$ldpath ldd "$binary" | awk '/not found/ { print $1 }' | sort -u | tr '\n' ' ')
[ -z "$missing" ] || fail "the unpacked QEMU lacks libraries: $missing(see $log)"

rm -rf "${dest:?}/$series"
mv "$stage" "$dest/$series"

{
    echo '#!/bin/sh'
    echo "# QEMU $series from Debian $suite, unpacked by tools/fetch-qemu.sh (not installed)."
    echo "# Firmware via -L, modules from the same unpacked tree."
    echo 'root=$(dirname "$(readlink -f "$0")")/'"$series"
    echo 'export QEMU_MODULE_DIR="$root/usr/lib/x86_64-linux-gnu/qemu"'
    if [ ${#libdirs[@]} -gt 0 ]; then
        lp=
        for d in "${libdirs[@]}"; do lp=${lp:+$lp:}'$root/'$d; done
        echo "export LD_LIBRARY_PATH=\"$lp\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
    fi
    echo 'exec "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" -L "$root/usr/lib/ipxe/qemu" "$@"'
} > "$wrapper.tmp"
chmod 755 "$wrapper.tmp"
mv "$wrapper.tmp" "$wrapper"

version=$("$wrapper" --version 2>&1 | head -n1) || fail "$wrapper --version failed: $version"
case $version in
    *"version $series"*) ;;
    *) fail "$wrapper is not QEMU $series: $version" ;;
esac
# The package lists, caches and .debs are not needed any more (about 30 MB).
rm -rf "$aptdir/state" "$aptdir/cache" "$debs"
echo "$wrapper"
