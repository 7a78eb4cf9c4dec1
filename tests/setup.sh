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

# --- Provenance and signing (issue 12): Debian's minisign checks the
# checksum signatures, and the in-toto reference libraries (in moto's
# virtualenv, the tests' Python) check the DSSE envelopes
# (tests/verify_attestation.py). Pinned; reinstalled when moto's venv is
# rebuilt.
log "minisign and the in-toto reference libraries (attestation tests)"
apt_install minisign
attest_venv="${IMGBUILD_MOTO_VENV:-$HOME/.cache/imgbuild/moto-venv}"
if ! "$attest_venv/bin/python" -c 'import in_toto, securesystemslib, in_toto_attestation' 2>/dev/null; then
  "$attest_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    'in-toto==3.1.0' 'securesystemslib[crypto]==1.6.0' 'in-toto-attestation==0.9.3'
fi
# --- end provenance and signing ---

# --- Docker push (issue 12): two local registries from Debian's
# docker-registry package, plain on 127.0.0.1:5000 and htpasswd over TLS
# with a test CA on 127.0.0.1:5443 (the CA goes to /etc/docker/certs.d;
# the password stays in a root-only file, never in the log).
log "Docker registries (push tests)"
bash .ci/start-registry.sh
# --- end Docker push ---

# --- SBOM (issue 12): the SPDX and CycloneDX reference libraries in a
# virtualenv of their own (tests/validate_sbom.py validates the documents
# with them; IMGBUILD_SBOM_VENV moves it). Pinned; reinstalled when the
# pins change.
log "spdx-tools and cyclonedx-python-lib (SBOM tests)"
sbom_venv="${IMGBUILD_SBOM_VENV:-$HOME/.cache/imgbuild/sbom-venv}"
sbom_spec="spdx-tools==0.8.5 cyclonedx-python-lib[json-validation]==11.12.0"
if [ "$(cat "$sbom_venv/.imgbuild-spec" 2>/dev/null)" != "$sbom_spec" ]; then
  python3 -m venv "$sbom_venv" || { apt_install python3-venv && python3 -m venv "$sbom_venv"; }
  # shellcheck disable=SC2086 # the spec is a list of requirements
  "$sbom_venv/bin/python" -m pip install --quiet --disable-pip-version-check $sbom_spec
  printf '%s' "$sbom_spec" >"$sbom_venv/.imgbuild-spec"
fi
# --- end SBOM ---

log "ready"
