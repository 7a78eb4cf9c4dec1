#!/usr/bin/env bash
# Prepares a fresh Debian 12 machine (as root) for imgbuild's builds, tests
# and benchmarks. Idempotent: a second run only checks.
#
#   bash tests/setup.sh            # everything: QEMU, Docker, moto, fixtures
#   bash tests/setup.sh qemu       # only what a QEMU build needs
#
# Prints nothing on stdout; progress on stderr.
set -Eeuo pipefail
exec 3>&1 1>&2
cd "$(dirname "$0")/.."

want=${1:-all}
log() { printf '[setup] %s\n' "$*"; }

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "${pkg%%/*}" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  if [ -z "${IMGBUILD_APT_UPDATED:-}" ]; then
    apt-get update -q
    export IMGBUILD_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --allow-downgrades "${missing[@]}"
}

# qemu-system-x86 from Debian needs Debian's qemu-utils: the machine's
# preinstalled backports qemu-utils is incompatible and would be removed.
qemu_utils_ok() {
  dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -qv bpo
}

log "packages"
apt_install debootstrap openssh-server openssh-client extlinux syslinux-common \
  e2fsprogs util-linux zstd curl git ca-certificates python3 ovmf ansible sshpass
if ! dpkg-query -W -f='${Status}' qemu-system-x86 2>/dev/null | grep -q "install ok installed" || ! qemu_utils_ok; then
  log "installing qemu-system-x86 with Debian's qemu-utils"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --allow-downgrades \
    qemu-system-x86 qemu-utils/bookworm
fi

log "QEMU base image"
tests/fixtures/base-vm-image.sh >/dev/null
if [ "$want" = qemu ]; then
  log "ready for QEMU builds"
  exit 0
fi
tests/fixtures/base-vm-image.sh --cloud-init >/dev/null

log "Docker engine"
bash .ci/start-dockerd.sh
tests/fixtures/docker-base-image.sh >/dev/null
tests/fixtures/docker-base-image.sh --with-sshd >/dev/null

log "moto (local EC2 endpoint)"
bash .ci/start-moto.sh

log "ready"
