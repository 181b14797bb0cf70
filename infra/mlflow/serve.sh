#!/usr/bin/env bash
# MLflow tracking server + model registry: a database backend and an artifact store, served by one process.
#
#   infra/mlflow/serve.sh                      # SQLite + local artifacts under ~/.local/share/glimpse/mlflow, 127.0.0.1:5000
#   GLIMPSE_MLFLOW_HOST=0.0.0.0 GLIMPSE_MLFLOW_ALLOWED_HOSTS=mlflow.internal:5000 \
#   GLIMPSE_MLFLOW_BACKEND_URI=postgresql://mlflow:PASSWORD@db.internal:5432/mlflow \
#   GLIMPSE_MLFLOW_ARTIFACTS=s3://BUCKET/mlflow-artifacts infra/mlflow/serve.sh      # a team server
#
# Clients (training jobs, `mlflow.MlflowClient`) only need MLFLOW_TRACKING_URI=http://HOST:PORT: runs,
# metrics and the model registry go to the database, artifacts are uploaded through the server
# (--artifacts-destination), so clients need no credentials for the artifact store.
# The same script runs the local stack's server (infra/local/start.sh) and the Kubernetes one
# (infra/mlflow-server.yaml). It execs mlflow, so its pid is the server's.
#
# Settings (environment):
#   GLIMPSE_MLFLOW_ROOT           where the default SQLite file and artifacts live (~/.local/share/glimpse/mlflow)
#   GLIMPSE_MLFLOW_BACKEND_URI    SQLAlchemy URI of the database (sqlite:///$ROOT/mlflow.db)
#   GLIMPSE_MLFLOW_ARTIFACTS      artifact store: a local folder or s3://, gs://, ... ($ROOT/artifacts)
#   GLIMPSE_MLFLOW_HOST / _PORT   interface and port to bind (127.0.0.1 / 5000)
#   GLIMPSE_MLFLOW_WORKERS        server worker processes (2)
#   GLIMPSE_MLFLOW_ALLOWED_HOSTS  Host headers to accept, comma-separated (MLflow's default: localhost and private IPs)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ -x "$repo/.venv/bin/mlflow" ]]; then
    mlflow_bin="$repo/.venv/bin/mlflow"
else
    mlflow_bin=$(command -v mlflow) || { echo "serve.sh: mlflow not found (no $repo/.venv, none on PATH)" >&2; exit 1; }
fi

root=${GLIMPSE_MLFLOW_ROOT:-${XDG_DATA_HOME:-$HOME/.local/share}/glimpse/mlflow}
backend=${GLIMPSE_MLFLOW_BACKEND_URI:-sqlite:///$root/mlflow.db}
artifacts=${GLIMPSE_MLFLOW_ARTIFACTS:-$root/artifacts}
host=${GLIMPSE_MLFLOW_HOST:-127.0.0.1}
port=${GLIMPSE_MLFLOW_PORT:-5000}
workers=${GLIMPSE_MLFLOW_WORKERS:-2}

# Local stores: create their folders; a local artifact folder becomes an absolute file:// URI.
if [[ $backend == sqlite:///* ]]; then
    mkdir -p "$(dirname "${backend#sqlite:///}")"
fi
if [[ $artifacts != *://* ]]; then
    mkdir -p "$artifacts"
    artifacts="file://$(cd "$artifacts" && pwd)"
fi

# Glimpse uses no server-side MLflow jobs (GenAI evaluation): without them the server runs no huey
# consumers (several processes, state in /dev/shm). MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true turns them on.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

args=(server --backend-store-uri "$backend" --artifacts-destination "$artifacts"
      --host "$host" --port "$port" --workers "$workers")
if [[ -n ${GLIMPSE_MLFLOW_ALLOWED_HOSTS:-} ]]; then
    args+=(--allowed-hosts "$GLIMPSE_MLFLOW_ALLOWED_HOSTS")
fi
# Log the command line with any database password masked.
echo "serve.sh: $mlflow_bin ${args[*]}" | sed -E 's#(://[^:/@ ]+:)[^@ ]*@#\1***@#g' >&2
exec "$mlflow_bin" "${args[@]}"
