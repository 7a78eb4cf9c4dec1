#!/usr/bin/env bash
# imgbuild vs Packer 1.6.6 on the same builds, in one run.
#
#   bash bench/run.sh                       # everything, 3 runs per tool and scenario
#   bash bench/run.sh --runs 5              # more runs
#   bash bench/run.sh --scenario qemu       # one scenario (repeatable):
#                                           #   qemu docker ec2 upload parallel cache scp micro
#   bash bench/run.sh --skip-setup --no-micro --scenario docker   # quick iteration
#   bash bench/run.sh --help                # all options
#
# Run it as root on the Debian 12 dev/CI machine. It installs what it needs
# (Debian's `packer` 1.6.6 and `sshpass` with apt-get; QEMU, Docker, moto
# and the fixtures with tests/setup.sh), builds imgbuild with
# `cargo build --release`, starts its own moto server (port 5057) and an
# SSH target container, then runs each scenario N times per tool,
# alternating imgbuild and Packer (and which of them goes first), then the
# scp baseline and the criterion micro-benchmarks (`cargo bench --bench hash
# --bench config_load`).
#
# Output: a table on the terminal, bench/results/<timestamp>.json,
# bench/results/latest.json and bench/results/latest.svg (ratios
# imgbuild/Packer). Logs of every run, the tools' outputs and commands:
# ~/.cache/imgbuild/bench/runs/<timestamp>/ (--work DIR to move it).
# Method and what exactly is measured: bench/README.md.
#
# Takes about 30 minutes with --runs 3 on the 2-core machine, most of it
# booting VMs under TCG (KVM is unusable there). Python 3 standard library
# only.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
[[ "$(id -u)" == 0 ]] || { echo "bench/run.sh: run as root (apt-get, debootstrap, dockerd)" >&2; exit 2; }
exec python3 bench/bench.py "$@"
