#!/usr/bin/env bash
# Glimpse's whole stack on one machine, on loopback: a Ray head (GCS, dashboard, job server) and an MLflow
# tracking server (SQLite backend, local artifact store). Jobs are then submitted exactly as to a cluster:
#
#   eval "$(infra/local/start.sh)"     # start, and export RAY_ADDRESS, MLFLOW_TRACKING_URI, RAY_AUTH_*
#   ray job submit --working-dir . -- python jobs/train_kinetics.py --preset smoke
#   infra/local/stop.sh                # stop this stack (and only this one)
#
# stdout carries only the export lines (also written to $GLIMPSE_STACK_DIR/env.sh); progress goes to stderr.
# Running it again while the stack is up prints the same exports. Jobs inherit MLFLOW_TRACKING_URI from the
# Ray head, as they would on a cluster whose nodes have it set, so `ray job submit` needs nothing more.
#
# Settings (environment):
#   GLIMPSE_STACK_DIR             state: pids, logs, Ray temp dir, MLflow database and artifacts
#                                 (default ~/.cache/glimpse/local-stack)
#   GLIMPSE_RAY_PORT              Ray GCS port (6379)
#   GLIMPSE_DASHBOARD_PORT        Ray dashboard and job server (8265)
#   GLIMPSE_RAY_CLIENT_PORT       Ray client server (10001)
#   GLIMPSE_DASHBOARD_AGENT_PORT  Ray dashboard agent (52365)
#   GLIMPSE_MLFLOW_PORT           MLflow server (5000)
#   GLIMPSE_MLFLOW_WORKERS        MLflow server processes (1)
#   GLIMPSE_RAY_NUM_CPUS          CPUs the Ray head offers (all of them)
#   GLIMPSE_RAY_OBJECT_STORE_MEMORY  object store size in bytes (Ray's default)
#   GLIMPSE_RAY_TEMP_DIR          Ray's temp dir ($GLIMPSE_STACK_DIR/ray, or a /tmp folder when that path is too
#                                 long for Ray's socket names)
#   GLIMPSE_RAY_AUTH_MODE         token (default: the stack's own token in $GLIMPSE_STACK_DIR/auth_token) or disabled
#   GLIMPSE_STACK_TIMEOUT         seconds to wait for each service to answer (120)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=infra/local/common.sh
source "$here/common.sh"

host=127.0.0.1
ray_port=${GLIMPSE_RAY_PORT:-6379}
dashboard_port=${GLIMPSE_DASHBOARD_PORT:-8265}
client_port=${GLIMPSE_RAY_CLIENT_PORT:-10001}
agent_port=${GLIMPSE_DASHBOARD_AGENT_PORT:-52365}
mlflow_port=${GLIMPSE_MLFLOW_PORT:-5000}
auth_mode=${GLIMPSE_RAY_AUTH_MODE:-token}
timeout=${GLIMPSE_STACK_TIMEOUT:-120}
[[ $auth_mode == token || $auth_mode == disabled ]] \
    || { log "GLIMPSE_RAY_AUTH_MODE must be token or disabled, not '$auth_mode'"; exit 2; }

# wait_http URL [TOKEN [PID [SECONDS]]]: until URL answers 200 (exit 0), SECONDS pass ($timeout; exit 1),
# or PID dies (exit 3).
wait_http() {
    "$py" - "$1" "${2:-}" "${4:-$timeout}" "${3:-}" <<'PY'
import os, sys, time, urllib.request
url, token, timeout, pid = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
headers = {"Authorization": f"Bearer {token}"} if token else {}
deadline = time.time() + timeout
while time.time() < deadline:
    if pid and not os.path.exists(f"/proc/{pid}"):
        sys.exit(3)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(1)
PY
}

# ports_in_use PORT...: print those already bound on this machine.
ports_in_use() {
    "$py" - "$@" <<'PY'
import socket, sys
for port in sys.argv[1:]:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError:
            print(port)
PY
}

print_exports() { cat "$state/env.sh"; }

mkdir -p "$state/logs"

# Already up? Print the exports again. Left over from a failed start or a crash? Clear that first.
if [[ -f $state/stack_id ]]; then
    old_pids=$(stack_pids "$(cat "$state/stack_id")" "$(cat "$state/ray_temp_dir" 2>/dev/null || true)" "$state/sids")
    if [[ -n $old_pids && -f $state/env.sh && -f $state/ports.env ]] \
        && (  # shellcheck disable=SC1091
              source "$state/ports.env" \
              && wait_http "http://$host:$GLIMPSE_STACK_MLFLOW_PORT/health" "" "" 5 \
              && wait_http "http://$host:$GLIMPSE_STACK_DASHBOARD_PORT/api/version" \
                     "$(cat "$state/auth_token" 2>/dev/null)" "" 5); then
        log "already running (state in $state); stop it with infra/local/stop.sh"
        print_exports
        exit 0
    fi
    log "clearing what is left of a previous start"
    "$here/stop.sh" >&2 || true
fi

busy=$(ports_in_use "$ray_port" "$dashboard_port" "$client_port" "$agent_port" "$mlflow_port" | tr '\n' ' ')
if [[ -n $busy ]]; then
    log "port(s) ${busy% } already in use; choose others with GLIMPSE_RAY_PORT, GLIMPSE_DASHBOARD_PORT," \
        "GLIMPSE_RAY_CLIENT_PORT, GLIMPSE_DASHBOARD_AGENT_PORT, GLIMPSE_MLFLOW_PORT"
    exit 1
fi

# Ray's temp dir: Unix socket paths under it must stay below 108 bytes, and a session adds about 60.
ray_tmp=${GLIMPSE_RAY_TEMP_DIR:-}
if [[ -z $ray_tmp ]]; then
    ray_tmp=$(cat "$state/ray_temp_dir" 2>/dev/null || true)
    if [[ -z $ray_tmp || ! -d $ray_tmp ]]; then
        ray_tmp="$state/ray"
        (( ${#ray_tmp} <= 40 )) || ray_tmp=$(mktemp -d /tmp/glimpse-ray.XXXXXX)
    fi
fi
# The temp dir is the stack's alone: stop.sh recognises processes by it. One that holds something else
# (say /tmp/ray, every default Ray's) is refused.
[[ $ray_tmp == /* ]] || ray_tmp="$PWD/$ray_tmp"
if [[ -d $ray_tmp && ! -e $ray_tmp/.glimpse-stack && -n $(ls -A "$ray_tmp") ]]; then
    log "GLIMPSE_RAY_TEMP_DIR=$ray_tmp is not empty and not a Glimpse stack's: give a folder of its own"
    exit 2
fi
mkdir -p "$ray_tmp"
touch "$ray_tmp/.glimpse-stack"
echo "$ray_tmp" > "$state/ray_temp_dir"

# The stack's identity (see stack_pids in common.sh): every process started below inherits it. It is
# given with env(1), which appends it to the end of the environment, where a process that rewrites its
# title over its argv and environ area (Ray's agents and workers do) leaves it readable.
stack_id=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
echo "$stack_id" > "$state/stack_id"
unset GLIMPSE_LOCAL_STACK_ID
: > "$state/sids"

# Environment of the services, and so of every Ray worker and job driver.
export PATH="$bin:$PATH"
export MLFLOW_TRACKING_URI="http://$host:$mlflow_port"
export RAY_USAGE_STATS_ENABLED=0
unset RAY_ADDRESS RAY_AUTH_TOKEN
token=""
if [[ $auth_mode == token ]]; then
    if [[ ! -s $state/auth_token ]]; then
        (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$state/auth_token")
    fi
    token=$(cat "$state/auth_token")
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$state/auth_token"
else
    export RAY_AUTH_MODE=disabled
    unset RAY_AUTH_TOKEN_PATH
fi

cleanup_on_failure() {
    log "start failed; logs in $state/logs"
    "$here/stop.sh" >&2 || true
}
trap cleanup_on_failure ERR

# MLflow first (it boots while Ray starts), in a session of its own, detached from this terminal.
log "starting MLflow on $MLFLOW_TRACKING_URI (SQLite and artifacts in $state/mlflow)"
unset GLIMPSE_MLFLOW_BACKEND_URI GLIMPSE_MLFLOW_ARTIFACTS GLIMPSE_MLFLOW_ALLOWED_HOSTS
# shellcheck disable=SC2016  # $$ and $@ belong to the inner shell
GLIMPSE_MLFLOW_ROOT="$state/mlflow" GLIMPSE_MLFLOW_HOST=$host GLIMPSE_MLFLOW_PORT=$mlflow_port \
GLIMPSE_MLFLOW_WORKERS=${GLIMPSE_MLFLOW_WORKERS:-1} \
    setsid bash -c 'echo $$ > "$1"; echo $$ >> "$2"; shift 2; exec "$@"' _ "$state/mlflow.pid" "$state/sids" \
        env GLIMPSE_LOCAL_STACK_ID="$stack_id" "$repo/infra/mlflow/serve.sh" \
    > "$state/logs/mlflow.log" 2>&1 < /dev/null &

# The dashboard / job server and the client server listen on 127.0.0.1; Ray itself replaces a loopback
# node address by the machine's own (its GCS listens on all interfaces), so clients reach it at
# 127.0.0.1:$ray_port as at that address. The token guards all of it.
log "starting the Ray head on $host:$ray_port, dashboard http://$host:$dashboard_port (temp dir $ray_tmp)"
ray_args=(start --head --node-ip-address "$host" --port "$ray_port"
          --include-dashboard true --dashboard-host "$host" --dashboard-port "$dashboard_port"
          --dashboard-agent-listen-port "$agent_port" --ray-client-server-port "$client_port"
          --temp-dir "$ray_tmp" --disable-usage-stats)
if [[ -n ${GLIMPSE_RAY_NUM_CPUS:-} ]]; then ray_args+=(--num-cpus "$GLIMPSE_RAY_NUM_CPUS"); fi
if [[ -n ${GLIMPSE_RAY_OBJECT_STORE_MEMORY:-} ]]; then
    ray_args+=(--object-store-memory "$GLIMPSE_RAY_OBJECT_STORE_MEMORY")
fi
# In a session of its own too: Ray's daemons, agents and workers stay in it (job drivers get their own).
# shellcheck disable=SC2016  # $$ and $@ belong to the inner shell
if ! setsid -w bash -c 'echo $$ >> "$1"; shift; exec "$@"' _ "$state/sids" \
        env GLIMPSE_LOCAL_STACK_ID="$stack_id" "$bin/ray" "${ray_args[@]}" \
        > "$state/logs/ray-start.log" 2>&1 < /dev/null; then
    tail -n 30 "$state/logs/ray-start.log" >&2
    false
fi

if ! wait_http "http://$host:$dashboard_port/api/version" "$token"; then
    log "the Ray dashboard did not answer within ${timeout}s (logs: $ray_tmp/session_latest/logs)"
    false
fi
mlflow_pid=$(cat "$state/mlflow.pid" 2>/dev/null || true)
if ! wait_http "$MLFLOW_TRACKING_URI/health" "" "$mlflow_pid"; then
    log "the MLflow server did not answer within ${timeout}s:"
    tail -n 30 "$state/logs/mlflow.log" >&2
    false
fi
trap - ERR

cat > "$state/ports.env" <<EOF
GLIMPSE_STACK_RAY_PORT=$ray_port
GLIMPSE_STACK_DASHBOARD_PORT=$dashboard_port
GLIMPSE_STACK_RAY_CLIENT_PORT=$client_port
GLIMPSE_STACK_DASHBOARD_AGENT_PORT=$agent_port
GLIMPSE_STACK_MLFLOW_PORT=$mlflow_port
EOF
{
    echo "export RAY_ADDRESS=http://$host:$dashboard_port"
    echo "export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    if [[ $auth_mode == token ]]; then
        echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
    else
        echo "unset RAY_AUTH_TOKEN_PATH"
    fi
    echo "unset RAY_AUTH_TOKEN"
} > "$state/env.sh"

log "up. Ray dashboard http://$host:$dashboard_port, MLflow UI $MLFLOW_TRACKING_URI, GCS address $host:$ray_port"
log "submit:  ray job submit --working-dir . -- python jobs/train_kinetics.py --preset smoke"
log "stop:    infra/local/stop.sh   (exports also in $state/env.sh)"
print_exports
