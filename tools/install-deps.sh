#!/bin/sh
# Installs the build dependencies that are missing (Debian/Ubuntu): a C compiler, meson,
# ninja, pkg-config, cmocka and Open MPI (for dist/ and its tests under mpirun). Uses apt-get as root, sudo otherwise; installs nothing that
# is already present.
set -e
missing=""
command -v cc >/dev/null 2>&1 || missing="$missing gcc"
command -v meson >/dev/null 2>&1 || missing="$missing meson"
command -v ninja >/dev/null 2>&1 || missing="$missing ninja-build"
command -v pkg-config >/dev/null 2>&1 || missing="$missing pkg-config"
if ! pkg-config --exists cmocka 2>/dev/null && [ ! -f /usr/include/cmocka.h ]; then
    missing="$missing libcmocka-dev"
fi
command -v mpicc >/dev/null 2>&1 || missing="$missing libopenmpi-dev"
command -v mpirun >/dev/null 2>&1 || missing="$missing openmpi-bin"
for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing build dependencies:$missing (install them with your package manager)" >&2
    exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
echo "installing:$missing"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
