#!/usr/bin/env bash
# Make sure a Docker engine answers `docker info`, starting dockerd if needed.
#
#   bash .ci/start-dockerd.sh       # idempotent; exits 0 once `docker info` works
#
# CI machines have no init system and no engine running; Debian's docker.io
# package provides dockerd (20.10), containerd and runc. If dockerd is missing
# the script installs docker.io with apt-get (set IMGBUILD_NO_APT=1 to forbid).
#
# dockerd is started with the vfs storage driver (overlayfs does not work on
# these machines). Networking is tried in this order; the first flag set under
# which dockerd comes up wins, and its name is written to $MODEFILE:
#   bridge             default bridge + iptables. `-p 127.0.0.1:PORT:22` works.
#                      (the one that works on the CI machines as of writing)
#   bridge-noiptables  --iptables=false --ip6tables=false: `-p 127.0.0.1:...`
#                      still works (docker-proxy, the userland proxy, forwards
#                      loopback to the bridge); containers get no NAT to outside.
#   host-only          also --bridge=none: containers must use --network host.
# `--network host` works in every mode.
#
# Environment:
#   IMGBUILD_DOCKERD_LOG         log file     (default /var/log/imgbuild-dockerd.log)
#   IMGBUILD_DOCKERD_PIDFILE     pidfile      (default /run/imgbuild-dockerd.pid)
#   IMGBUILD_DOCKERD_TIMEOUT     seconds to wait per attempt (default 60)
#   IMGBUILD_DOCKERD_DATA_ROOT   --data-root  (default dockerd's /var/lib/docker)
#   IMGBUILD_DOCKERD_NETWORK     force one mode: bridge|bridge-noiptables|host-only
#   IMGBUILD_DOCKERD_EXTRA_ARGS  extra dockerd flags (word-split)
#   IMGBUILD_NO_APT=1            never run apt-get
# Stop it with: kill "$(cat /run/imgbuild-dockerd.pid)"
set -euo pipefail

LOG="${IMGBUILD_DOCKERD_LOG:-/var/log/imgbuild-dockerd.log}"
PIDFILE="${IMGBUILD_DOCKERD_PIDFILE:-/run/imgbuild-dockerd.pid}"
TIMEOUT="${IMGBUILD_DOCKERD_TIMEOUT:-60}"
MODEFILE="${PIDFILE%.pid}.network"
LOCKFILE="${PIDFILE%.pid}.lock"

log() { printf 'start-dockerd: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

docker_ok() { timeout 20 docker info >/dev/null 2>&1; }

if command -v docker >/dev/null 2>&1 && docker_ok; then
    exit 0
fi

[[ "$(id -u)" == 0 ]] || die "dockerd must be started as root (no engine answers and we are uid $(id -u))"

apt_install() {
    [[ "${IMGBUILD_NO_APT:-0}" != 1 ]] || die "missing $*; IMGBUILD_NO_APT=1 forbids installing it"
    command -v apt-get >/dev/null 2>&1 || die "missing $* and no apt-get"
    log "installing $* with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || apt-get update >&2
    apt-get install -y -qq --no-install-recommends "$@" >&2
}

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1 \
    || ! command -v containerd >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1; then
    apt_install docker.io
fi
command -v dockerd >/dev/null 2>&1 || die "dockerd not found even after installing docker.io"

mkdir -p "$(dirname "$LOG")" "$(dirname "$PIDFILE")"
# Serialise concurrent callers. The lock fd is closed for dockerd (9>&-) so the
# lock does not outlive this script.
exec 9>"$LOCKFILE"
flock -w $((TIMEOUT * 4)) 9 || die "could not take $LOCKFILE"
docker_ok && exit 0

wait_ready() { # pid -> 0 ready, 1 dockerd died, 2 timed out
    local pid="$1" deadline=$((SECONDS + TIMEOUT))
    while (( SECONDS < deadline )); do
        docker_ok && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.5
    done
    docker_ok && return 0
    return 2
}

fail_with_log() {
    log "$1; last lines of $LOG:"
    tail -n 40 "$LOG" >&2 || true
    exit 1
}

# A dockerd we (or someone) started earlier may still be initialising: wait for
# it rather than start a second one on the same /var/lib/docker.
existing=""
if [[ -f "$PIDFILE" ]]; then
    p="$(cat "$PIDFILE" 2>/dev/null || true)"
    if [[ -n "$p" ]] && [[ "$(cat "/proc/$p/comm" 2>/dev/null || true)" == dockerd ]]; then
        existing="$p"
    else
        rm -f "$PIDFILE"
    fi
fi
if [[ -z "$existing" ]]; then
    existing="$(pgrep -x dockerd | head -n1 || true)"
fi
if [[ -n "$existing" ]]; then
    log "dockerd (pid $existing) is running but not answering yet; waiting up to ${TIMEOUT}s"
    wait_ready "$existing" && { log "docker engine ready"; exit 0; }
    fail_with_log "dockerd pid $existing does not answer 'docker info' (stop it or fix DOCKER_HOST)"
fi

declare -A MODE_FLAGS=(
    [bridge]=""
    [bridge-noiptables]="--iptables=false --ip6tables=false"
    [host-only]="--iptables=false --ip6tables=false --bridge=none"
)
if [[ -n "${IMGBUILD_DOCKERD_NETWORK:-}" ]]; then
    [[ -n "${MODE_FLAGS[$IMGBUILD_DOCKERD_NETWORK]+x}" ]] \
        || die "IMGBUILD_DOCKERD_NETWORK must be bridge, bridge-noiptables or host-only"
    modes=("$IMGBUILD_DOCKERD_NETWORK")
else
    modes=(bridge bridge-noiptables host-only)
fi

: >"$LOG"
for mode in "${modes[@]}"; do
    # shellcheck disable=SC2206
    args=(--storage-driver=vfs --pidfile="$PIDFILE" --host=unix:///var/run/docker.sock
          ${MODE_FLAGS[$mode]}
          ${IMGBUILD_DOCKERD_DATA_ROOT:+--data-root="$IMGBUILD_DOCKERD_DATA_ROOT"}
          ${IMGBUILD_DOCKERD_EXTRA_ARGS:-})
    log "starting dockerd (${mode}): dockerd ${args[*]}  (log: $LOG)"
    echo "=== $(date -u +%FT%TZ) start-dockerd: dockerd ${args[*]}" >>"$LOG"
    logstart=$(wc -l <"$LOG")
    # setsid+nohup: dockerd outlives this script and the caller's session.
    setsid nohup dockerd "${args[@]}" </dev/null >>"$LOG" 2>&1 9>&- &
    pid=$!
    rc=0; wait_ready "$pid" || rc=$?
    case "$rc" in
        0)  echo "$mode" >"$MODEFILE"
            log "docker engine ready (pid $pid, network mode $mode, $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
            exit 0 ;;
        1)  log "dockerd exited during start-up in mode $mode:"
            tail -n +"$((logstart + 1))" "$LOG" | tail -n 8 >&2 || true
            rm -f "$PIDFILE" ;;
        *)  fail_with_log "dockerd (pid $pid) did not answer within ${TIMEOUT}s" ;;
    esac
done
log "dockerd would not start in any network mode; see $LOG"
exit 1
