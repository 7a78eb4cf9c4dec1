#!/usr/bin/env bash
# Sets up everything the tests need (tests/setup.sh) and runs the whole test
# suite against real QEMU, OpenSSH, Docker and a local EC2 endpoint (moto).
#
#   bash tests/run.sh [extra cargo test arguments]
set -Eeuo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
export IMGBUILD_TEST_BASE_IMAGE="$(tests/fixtures/base-vm-image.sh)"
export IMGBUILD_TEST_CLOUD_IMAGE="$(tests/fixtures/base-vm-image.sh --cloud-init)"
export IMGBUILD_TEST_DOCKER_IMAGE="$(tests/fixtures/docker-base-image.sh)"
export IMGBUILD_TEST_SSHD_IMAGE="$(tests/fixtures/docker-base-image.sh --with-sshd)"
cargo test --workspace --locked "$@"
