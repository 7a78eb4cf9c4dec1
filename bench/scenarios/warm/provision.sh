#!/bin/sh
# The shell provisioner of every benchmark scenario: writes one file and
# installs nothing, so the tools' own overhead is what gets measured.
set -e
printf 'bench image built by %s\n' "${BENCH_TOOL:-unknown}" > /etc/bench-release
cat /etc/bench-release
