#!/usr/bin/env bash
# Stop the stack infra/local/start.sh started: its Ray head with every daemon, worker and job driver, and
# its MLflow server with its workers. Only this stack: processes are found by the stack's own mark (see
# stack_pids in common.sh), never by name, so other Ray clusters on the machine keep running (`ray stop`
# would stop them all). SIGTERM first, SIGKILL for what is left after GLIMPSE_STOP_TIMEOUT seconds (10).
#
#   infra/local/stop.sh            # stop; the MLflow database, artifacts and logs stay in the state dir
#   infra/local/stop.sh --purge    # stop, then delete the state dir (and the Ray temp dir) too
#
# GLIMPSE_STACK_DIR selects the stack, as for start.sh.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=infra/local/common.sh
source "$here/common.sh"

purge=""
case "${1:-}" in
    --purge) purge=1 ;;
    "") ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac
grace=${GLIMPSE_STOP_TIMEOUT:-10}

if [[ ! -d $state ]]; then
    log "no stack state in $state: nothing to stop"
    exit 0
fi
stack_id=$(cat "$state/stack_id" 2>/dev/null || true)
ray_tmp=$(cat "$state/ray_temp_dir" 2>/dev/null || true)
# Processes are recognised by the temp dir only if it is the stack's own (start.sh marked it).
[[ -n $ray_tmp && -e $ray_tmp/.glimpse-stack ]] || ray_tmp=""

alive() {  # the given pids that still exist and are not zombies
    local pid stat
    for pid in "$@"; do
        read -r stat 2>/dev/null < "/proc/$pid/stat" || continue
        stat=${stat##*) }
        [[ ${stat:0:1} == Z ]] || echo "$pid"
    done
}

terminate() {  # terminate PID...: SIGTERM, wait up to $grace seconds, SIGKILL what is left
    (( $# )) || return 0
    local -a left
    log "SIGTERM to $*"
    kill -TERM "$@" 2>/dev/null || true
    stopped=$(( stopped + $# ))
    local deadline=$(( SECONDS + grace ))
    while (( SECONDS < deadline )); do
        mapfile -t left < <(alive "$@")
        (( ${#left[@]} )) || return 0
        sleep 0.5
    done
    mapfile -t left < <(alive "$@")
    if (( ${#left[@]} )); then
        log "SIGKILL to ${left[*]} (still running after ${grace}s)"
        kill -KILL "${left[@]}" 2>/dev/null || true
        sleep 0.5
    fi
}

by_name() {  # by_name NAME PID...: the pids whose executable name is NAME
    local name=$1 pid comm
    shift
    for pid in "$@"; do
        read -r comm 2>/dev/null < "/proc/$pid/comm" || continue
        [[ $comm == "$name" ]] && echo "$pid"
    done
    return 0
}

stopped=0
if [[ -n $stack_id || -n $ray_tmp ]]; then
    # Ray's own order (as `ray stop`): raylets first (their workers go with them), then everything else
    # (dashboard, agents, job drivers, MLflow), the GCS last. A dying raylet can still start a worker,
    # so look again after each round.
    for _ in 1 2 3; do
        mapfile -t pids < <(stack_pids "$stack_id" "$ray_tmp" "$state/sids")
        (( ${#pids[@]} )) || break
        mapfile -t group < <(by_name raylet "${pids[@]}")
        terminate "${group[@]}"
        mapfile -t gcs < <(by_name gcs_server "${pids[@]}")
        mapfile -t group < <(stack_pids "$stack_id" "$ray_tmp" "$state/sids" | grep -vxF -f <(printf '%s\n' "${gcs[@]}" 0))
        terminate "${group[@]}"
        terminate "${gcs[@]}"
    done
    mapfile -t pids < <(stack_pids "$stack_id" "$ray_tmp" "$state/sids")
    if (( ${#pids[@]} )); then
        log "could not stop: ${pids[*]}"
        exit 1
    fi
fi

rm -f "$state/env.sh" "$state/ports.env" "$state/mlflow.pid" "$state/stack_id" "$state/sids"
if [[ -n $purge ]]; then
    # A Ray temp dir outside the state dir is removed only if start.sh made it (never e.g. /tmp/ray).
    if [[ $ray_tmp == /tmp/glimpse-ray.* ]]; then rm -rf "$ray_tmp"; fi
    rm -rf "$state"
    log "stopped ($stopped process(es)); removed $state"
else
    log "stopped ($stopped process(es)); data and logs kept in $state"
fi
