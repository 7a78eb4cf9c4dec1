#!/usr/bin/env bash
# Start two local Docker registries (Debian's `docker-registry`, the CNCF
# distribution registry) for the push tests:
#
#   plain  http://127.0.0.1:5000   no auth (dockerd treats 127.0.0.0/8 as insecure)
#   auth   https://127.0.0.1:5443  htpasswd auth over TLS, with a test CA made here
#
#   bash .ci/start-registry.sh      # idempotent; exits 0 once both answer
#
# Not systemd services (CI has no init): each runs the registry binary with
# its own config under the state directory, restarted only when it does not
# answer. The test CA is installed for dockerd as
# /etc/docker/certs.d/127.0.0.1:<tls port>/ca.crt.
#
# Files under $STATE (readable by root only where secret):
#   tls/ca.crt                       the test CA (trust it to talk to the TLS registry)
#   auth/username, auth/password     the TLS registry's user (password: 0600, never printed)
#   auth/htpasswd                    bcrypt, made with `htpasswd -B`
#   {plain,auth}.log, *.pid          server logs and pids
#
# Environment:
#   IMGBUILD_REGISTRY_STATE      state directory (default /var/lib/imgbuild-registry)
#   IMGBUILD_REGISTRY_PORT       plain registry port (default 5000)
#   IMGBUILD_REGISTRY_TLS_PORT   TLS + htpasswd registry port (default 5443)
#   IMGBUILD_NO_APT=1            never run apt-get
# Stop one with: kill "$(cat /var/lib/imgbuild-registry/plain.pid)"
set -euo pipefail

STATE="${IMGBUILD_REGISTRY_STATE:-/var/lib/imgbuild-registry}"
PLAIN_PORT="${IMGBUILD_REGISTRY_PORT:-5000}"
TLS_PORT="${IMGBUILD_REGISTRY_TLS_PORT:-5443}"
USERNAME=imgbuild

log() { printf 'start-registry: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

plain_answers() { curl -fsS -m 3 -o /dev/null "http://127.0.0.1:$PLAIN_PORT/v2/" 2>/dev/null; }
# Unauthenticated, the auth registry answers 401 with a Basic challenge.
tls_answers() {
    [[ -f "$STATE/tls/ca.crt" ]] || return 1
    local code
    code="$(curl -sS -m 3 -o /dev/null -w '%{http_code}' --cacert "$STATE/tls/ca.crt" \
        "https://127.0.0.1:$TLS_PORT/v2/" 2>/dev/null)" && [[ "$code" == 401 ]]
}

if plain_answers && tls_answers && [[ -f "/etc/docker/certs.d/127.0.0.1:$TLS_PORT/ca.crt" ]]; then
    exit 0
fi

[[ "$(id -u)" == 0 ]] || die "must run as root (installs packages, writes /etc/docker/certs.d)"

need=()
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
command -v htpasswd >/dev/null 2>&1 || need+=(apache2-utils)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [[ ${#need[@]} -gt 0 ]]; then
    [[ "${IMGBUILD_NO_APT:-0}" != 1 ]] || die "missing ${need[*]}; IMGBUILD_NO_APT=1 forbids installing"
    log "installing ${need[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || apt-get update >&2
    # The package's maintainer scripts try to start a service; without an
    # init system that is refused (policy-rc.d exit 101 is "not allowed").
    apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
REGISTRY_BIN="$(command -v docker-registry)"

mkdir -p "$STATE"
chmod 0755 "$STATE"
exec 9>"$STATE/start.lock"
flock -w 300 9 || die "could not take $STATE/start.lock"

# --- test CA and server certificate (made once) ---
mkdir -p "$STATE/tls"
if [[ ! -s "$STATE/tls/server.crt" || ! -s "$STATE/tls/ca.crt" ]]; then
    log "making a test CA and a certificate for 127.0.0.1 and localhost"
    (
        cd "$STATE/tls"
        umask 077
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 \
            -keyout ca.key -out ca.crt -subj "/CN=imgbuild test registry CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -sha256 -keyout server.key -out server.csr \
            -subj "/CN=127.0.0.1" 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > server.ext
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
            -days 3650 -sha256 -extfile server.ext -out server.crt 2>/dev/null
        chmod 0644 ca.crt server.crt
        rm -f server.csr server.ext
    )
fi
mkdir -p "/etc/docker/certs.d/127.0.0.1:$TLS_PORT"
install -m 0644 "$STATE/tls/ca.crt" "/etc/docker/certs.d/127.0.0.1:$TLS_PORT/ca.crt"

# --- the auth registry's user: a random password, kept in a 0600 file ---
mkdir -p "$STATE/auth"
if [[ ! -s "$STATE/auth/password" || ! -s "$STATE/auth/htpasswd" ]]; then
    log "making the auth registry's user $USERNAME (password in $STATE/auth/password)"
    (umask 077; openssl rand -hex 16 > "$STATE/auth/password")
    printf '%s\n' "$USERNAME" > "$STATE/auth/username"
    # -i: the password from stdin, so it is in no process list.
    htpasswd -iBc "$STATE/auth/htpasswd" "$USERNAME" < "$STATE/auth/password" 2>/dev/null
fi

# --- configs ---
cat > "$STATE/plain.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $STATE/plain-data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$PLAIN_PORT
EOF
cat > "$STATE/auth.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $STATE/auth-data
  delete:
    enabled: true
auth:
  htpasswd:
    realm: imgbuild-test
    path: $STATE/auth/htpasswd
http:
  addr: 127.0.0.1:$TLS_PORT
  tls:
    certificate: $STATE/tls/server.crt
    key: $STATE/tls/server.key
EOF

# start NAME CHECK: (re)starts the registry NAME unless CHECK passes.
start() {
    local name="$1" check="$2" pidfile="$STATE/$1.pid" oldpid pid
    "$check" && return 0
    if [[ -f "$pidfile" ]]; then
        oldpid="$(cat "$pidfile" 2>/dev/null || true)"
        if [[ -n "$oldpid" ]] && kill -0 "$oldpid" 2>/dev/null \
            && tr '\0' ' ' < "/proc/$oldpid/cmdline" 2>/dev/null | grep -q "$STATE/$name.yml"; then
            for _ in $(seq 1 20); do "$check" && return 0; sleep 0.3; done
            log "stopping unresponsive $name registry pid $oldpid"
            kill "$oldpid" 2>/dev/null || true
            sleep 1
        fi
        rm -f "$pidfile"
    fi
    log "starting the $name registry (log: $STATE/$name.log)"
    # setsid+nohup: outlives the caller; no stdin so CI never waits on it.
    setsid nohup "$REGISTRY_BIN" serve "$STATE/$name.yml" </dev/null >"$STATE/$name.log" 2>&1 9>&- &
    pid=$!
    echo "$pid" > "$pidfile"
    local deadline=$((SECONDS + 30))
    until "$check"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "the $name registry exited; log tail:"
            tail -n 20 "$STATE/$name.log" >&2 || true
            rm -f "$pidfile"
            exit 1
        fi
        (( SECONDS < deadline )) || { log "the $name registry did not answer within 30 s"; tail -n 20 "$STATE/$name.log" >&2 || true; exit 1; }
        sleep 0.2
    done
}

start plain plain_answers
start auth tls_answers
log "registries answering: http://127.0.0.1:$PLAIN_PORT (plain), https://127.0.0.1:$TLS_PORT (htpasswd, CA $STATE/tls/ca.crt)"
