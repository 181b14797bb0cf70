# shellcheck shell=bash
# Shared by infra/local/start.sh and stop.sh (sourced, not run): where the stack keeps its state,
# which binaries it uses, and how its processes are recognised.

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# State: pids, the Ray temp dir (unless its path is too long, see start.sh), logs, MLflow database and artifacts.
state=${GLIMPSE_STACK_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/glimpse/local-stack}
[[ $state == /* ]] || state="$PWD/$state"
state=${state%/}

# The repository's .venv if it has Ray and MLflow, else whatever PATH offers.
if [[ -x "$repo/.venv/bin/ray" && -x "$repo/.venv/bin/mlflow" ]]; then
    bin="$repo/.venv/bin"
else
    ray_path=$(command -v ray || true)
    [[ -n $ray_path ]] || { echo "glimpse-stack: ray not found (no $repo/.venv, none on PATH)" >&2; exit 1; }
    bin=$(dirname "$ray_path")
fi
# shellcheck disable=SC2034  # used by the scripts that source this file
if [[ -x "$bin/python" ]]; then py="$bin/python"; else py=$(command -v python3); fi

log() { echo "glimpse-stack: $*" >&2; }

_has_marker() {  # _has_marker PID MARKER: MARKER is a whole entry of the process's environment
    local kv found=""
    { while IFS= read -r -d '' kv || [[ -n $kv ]]; do
          if [[ $kv == "$2" ]]; then found=1; break; fi
      done; } 2>/dev/null < "/proc/$1/environ" || true
    [[ -n $found ]]
}

# A process belongs to the stack if any of these holds (nothing is chosen by name, so other Ray clusters
# on the machine are safe):
#  - GLIMPSE_LOCAL_STACK_ID=<id> is in its environment: start.sh gives it to the Ray head and the MLflow
#    server, and every daemon, agent, worker, job driver and MLflow worker inherits it;
#  - it is in one of the sessions start.sh created (setsid) for Ray and MLflow: this catches processes
#    whose environment reads back blank after they rewrote their title (Ray's agents and workers).
#    A session counts only while its number is not taken by a process outside the stack (pid reuse);
#  - the stack's Ray temp dir is on its command line.
#   stack_pids ID RAY_TEMP_DIR SIDS_FILE  -> the live (non-zombie) pids, one a line; never this shell or its ancestors
stack_pids() {
    local id=$1 ray_tmp=$2 sids_file=${3:-} marker="GLIMPSE_LOCAL_STACK_ID=$1" pid p kv stat rest cmd found dir sid
    local -A skip=() sids=()
    if [[ -n $sids_file && -f $sids_file ]]; then
        while read -r sid; do
            [[ $sid =~ ^[0-9]+$ ]] || continue
            # The session leader's pid, if alive, must itself be ours (else the number was reused).
            if read -r stat 2>/dev/null < "/proc/$sid/stat"; then
                rest=${stat##*) }
                if [[ ${rest:0:1} != Z ]] && ! _has_marker "$sid" "$marker"; then continue; fi
            fi
            sids[$sid]=1
        done < "$sids_file"
    fi
    p=$BASHPID
    while [[ -n $p && $p != 0 ]]; do   # this shell and its ancestors: never ours to kill
        skip[$p]=1
        read -r stat 2>/dev/null < "/proc/$p/stat" || break
        rest=${stat##*) }
        read -r _ p _ <<< "$rest"
    done
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        [[ -n ${skip[$pid]:-} ]] && continue
        read -r stat 2>/dev/null < "$dir/stat" || continue   # gone already
        rest=${stat##*) }
        [[ ${rest:0:1} == Z ]] && continue   # zombies are dead already
        if [[ -n $id ]] && _has_marker "$pid" "$marker"; then echo "$pid"; continue; fi
        read -r _ _ _ sid _ <<< "$rest"   # after the name: state ppid pgrp session ...
        if [[ -n ${sids[$sid]:-} ]]; then echo "$pid"; continue; fi
        if [[ -n $ray_tmp ]]; then
            cmd=" "
            { while IFS= read -r -d '' kv || [[ -n $kv ]]; do cmd+="$kv "; done; } 2>/dev/null < "$dir/cmdline" || true
            if [[ $cmd == *"$ray_tmp"[/\ ]* ]]; then echo "$pid"; fi
        fi
    done
}
