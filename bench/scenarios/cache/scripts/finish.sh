#!/bin/sh
# The cache scenario's last provisioner: small. bench.py rewrites the
# REVISION line in its copy of this file between builds ("a change to the
# last step only"); the image must then say the new revision.
set -e
REVISION=1
printf 'bench image built by %s\nrevision %s\n' "${BENCH_TOOL:-unknown}" "$REVISION" > /etc/bench-release
cat /etc/bench-release
