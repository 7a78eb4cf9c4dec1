#!/usr/bin/env bash
# Start a local moto server (fake AWS API) for the EC2 builder tests.
#
#   bash .ci/start-moto.sh          # idempotent; exits 0 once moto answers
#
# Environment:
#   IMGBUILD_MOTO_PORT   port on 127.0.0.1 (default 5055)
#   IMGBUILD_MOTO_VENV   virtualenv holding moto (default ~/.cache/imgbuild/moto-venv)
#   IMGBUILD_MOTO_SPEC   pip requirement to install (default "moto[server]==5.2.5");
#                        changing it rebuilds the venv
#   IMGBUILD_PYTHON      interpreter used to create the venv (default python3)
#   IMGBUILD_MOTO_STATE  directory for pidfile and log (default /tmp)
#   IMGBUILD_MOTO_STRICT 1 (default): start moto with MOTO_ENABLE_AMI_VALIDATION,
#                        MOTO_ENABLE_KEYPAIR_VALIDATION and
#                        MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION, so RunInstances
#                        rejects an unknown AMI, key pair or instance type as AWS
#                        does (moto accepts anything otherwise); 0: moto defaults
#
# After it returns, point the AWS SDK at the server, e.g.
#   AWS_ENDPOINT_URL=http://127.0.0.1:5055 AWS_ACCESS_KEY_ID=testing
#   AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
# moto keeps everything in memory: state lives until the server is stopped
# (`kill "$(cat /tmp/imgbuild-moto-5055.pid)"`) or reset with
#   curl -X POST http://127.0.0.1:5055/moto-api/reset
set -euo pipefail

PORT="${IMGBUILD_MOTO_PORT:-5055}"
VENV="${IMGBUILD_MOTO_VENV:-$HOME/.cache/imgbuild/moto-venv}"
SPEC="${IMGBUILD_MOTO_SPEC:-moto[server]==5.2.5}"
PYTHON="${IMGBUILD_PYTHON:-python3}"
STATE="${IMGBUILD_MOTO_STATE:-/tmp}"
PIDFILE="$STATE/imgbuild-moto-$PORT.pid"
LOG="$STATE/imgbuild-moto-$PORT.log"
URL="http://127.0.0.1:$PORT"
STAMP="$VENV/.imgbuild-ready"

log() { printf 'start-moto: %s\n' "$*" >&2; }

# True when a moto server answers on the port (its management API is moto-only,
# so some other service on the same port is not mistaken for it). The dashboard
# page stays small; data.json dumps every resource and grows slow enough over
# a test run to be mistaken for a dead server.
moto_answers() {
    local page
    page="$(curl -fsS -m 3 "$URL/moto-api/" 2>/dev/null)" && [[ "$page" == *Moto* ]]
}

if moto_answers; then
    log "moto already answering on $URL"
    exit 0
fi

mkdir -p "$STATE" "$(dirname "$VENV")"
# Serialise concurrent callers (parallel test jobs); the lock is dropped on exit.
exec 9>"$STATE/imgbuild-moto-$PORT.lock"
flock -w 600 9 || { log "could not take lock"; exit 1; }
if moto_answers; then
    log "moto already answering on $URL"
    exit 0
fi

# --- virtualenv (created once; rebuilt if missing, broken or SPEC changed) ---
if [[ ! -f "$STAMP" || "$(cat "$STAMP" 2>/dev/null)" != "$SPEC" || ! -x "$VENV/bin/moto_server" ]]; then
    log "creating virtualenv $VENV with $SPEC"
    rm -rf "$VENV"
    if ! "$PYTHON" -m venv "$VENV" >&2; then
        log "'$PYTHON -m venv' failed (on Debian's own python3 install python3-venv)"
        rm -rf "$VENV"
        exit 1
    fi
    if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$SPEC" >&2; then
        log "pip install $SPEC failed"
        rm -rf "$VENV"
        exit 1
    fi
    # Written last: a venv without the stamp is treated as incomplete.
    printf '%s\n' "$SPEC" > "$STAMP.tmp" && mv -f "$STAMP.tmp" "$STAMP"
fi

# --- stale server from an earlier run that no longer answers ---
if [[ -f "$PIDFILE" ]]; then
    oldpid="$(cat "$PIDFILE" 2>/dev/null || true)"
    if [[ -n "$oldpid" ]] && kill -0 "$oldpid" 2>/dev/null \
        && tr '\0' ' ' < "/proc/$oldpid/cmdline" 2>/dev/null | grep -q moto_server; then
        # Still starting up? give it a moment before replacing it.
        for _ in $(seq 1 20); do moto_answers && { log "moto answering on $URL"; exit 0; }; sleep 0.5; done
        log "killing unresponsive moto_server pid $oldpid"
        kill "$oldpid" 2>/dev/null || true
        sleep 1
    fi
    rm -f "$PIDFILE"
fi

if [[ "${IMGBUILD_MOTO_STRICT:-1}" != 0 ]]; then
    # moto tests these with bool(os.environ.get(...)): any non-empty value enables.
    export MOTO_ENABLE_AMI_VALIDATION=true MOTO_ENABLE_KEYPAIR_VALIDATION=true \
        MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION=true
fi

log "starting moto_server on $URL (log: $LOG)"
# setsid+nohup: survives the caller's shell; stdin closed so CI never waits on it.
setsid nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT" </dev/null >"$LOG" 2>&1 9>&- &
pid=$!
echo "$pid" > "$PIDFILE"

deadline=$((SECONDS + 60))
until moto_answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
        log "moto_server exited; log tail:"
        tail -n 30 "$LOG" >&2 || true
        rm -f "$PIDFILE"
        exit 1
    fi
    if (( SECONDS >= deadline )); then
        log "moto_server did not answer within 60 s; log tail:"
        tail -n 30 "$LOG" >&2 || true
        exit 1
    fi
    sleep 0.3
done
log "moto $("$VENV/bin/python" -c 'import moto; print(moto.__version__)' 2>/dev/null || echo '?') answering on $URL (pid $pid)"
