#!/bin/sh
# The cache scenario's first provisioner: about a minute of CPU-bound,
# deterministic work on the machine's own files, with no network (the
# machines reach nothing worth installing from): a reproducible tar stream
# of /usr (sorted, fixed owners and times), its first BENCH_WORK_MIB MiB
# through `gzip -9 -n`, BENCH_WORK_ROUNDS times, each round fed the digest
# of the one before so that none can be skipped. The final digest goes to
# /var/lib/bench/work.sha256; the same fixture gives the same digest every
# time, whichever tool runs it and whether the step came from a cache.
#
# The amounts are per builder (in the configs' `env`): the VM runs under
# TCG, several times slower than the container.
set -e
rounds=${BENCH_WORK_ROUNDS:?BENCH_WORK_ROUNDS is not set}
mib=${BENCH_WORK_MIB:?BENCH_WORK_MIB is not set}
digest=start
i=0
while [ "$i" -lt "$rounds" ]; do
  # The group's status is head's: tar ends on a broken pipe once head has
  # its bytes, which is expected.
  digest=$({
    printf '%s\n' "$digest"
    tar -cf - --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner /usr 2>/dev/null | head -c "${mib}M"
  } | gzip -9 -n | sha256sum | cut -d' ' -f1)
  i=$((i + 1))
done
mkdir -p /var/lib/bench
printf '%s\n' "$digest" > /var/lib/bench/work.sha256
echo "work: $rounds x $mib MiB of /usr through gzip -9: $digest"
