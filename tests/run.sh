#!/usr/bin/env bash
# Sets up everything the tests need (tests/setup.sh) and runs the whole test
# suite against real QEMU, OpenSSH, Docker and a local EC2 endpoint (moto).
#
#   bash tests/run.sh [extra arguments for cargo nextest run (cargo test
#                     where cargo-nextest is not installed)]
set -Eeuo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
export IMGBUILD_TEST_BASE_IMAGE="$(tests/fixtures/base-vm-image.sh)"
export IMGBUILD_TEST_CLOUD_IMAGE="$(tests/fixtures/base-vm-image.sh --cloud-init)"
export IMGBUILD_TEST_DOCKER_IMAGE="$(tests/fixtures/docker-base-image.sh)"
export IMGBUILD_TEST_SSHD_IMAGE="$(tests/fixtures/docker-base-image.sh --with-sshd)"
# No incremental state in a whole-suite run: it is never reused there and
# costs gigabytes of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
if cargo nextest --version >/dev/null 2>&1; then
    # Tests of different binaries run side by side (.config/nextest.toml).
    cargo nextest run --workspace --locked "$@"
    # nextest runs no doctests.
    cargo test --workspace --locked --doc
else
    cargo test --workspace --locked "$@"
fi
