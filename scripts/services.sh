#!/usr/bin/env bash
# The services the test suite talks to, started idempotently (fast when they already run; CI runs it as root
# on a fresh clone; `make pytest` calls `start` first).
#
#   scripts/services.sh start                 SLURM (slurmctld, slurmd, slurmdbd on MariaDB, munge) and the
#                                             Debian chromium + chromium-driver for browser tests
#   scripts/services.sh stop                  stop the SLURM daemons (MariaDB is left running)
#   scripts/services.sh status                what runs
#   scripts/services.sh mlflow-start DIR [PORT] [BACKEND_URI]
#                                             an MLflow tracking server for tests: one worker, no job runner
#                                             (about 12 s, 500 MB); backend default sqlite:///DIR/mlflow.db,
#                                             artifacts proxied into DIR/artifacts; PORT default: a free one.
#                                             Prints MLFLOW_TRACKING_URI=http://127.0.0.1:PORT as its last line;
#                                             its pid is in DIR/mlflow.pid, its log in DIR/mlflow.log.
#   scripts/services.sh mlflow-stop DIR       stop that server (its process group, by the pid file)
#
# Ray is not started here: the Ray launcher starts a private single-node cluster when it has no address
# (tests do that and stop it at the end).
#   WITH_BROWSER=0   skip the chromium install;   WITH_SLURM=0   skip SLURM
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
export DEBIAN_FRONTEND=noninteractive

apt_install_missing() {
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ "${#missing[@]}" -eq 0 ] && return 0
  echo "services: apt-get install ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_postgres() {
  # The API tests run against a real PostgreSQL at 127.0.0.1:5432 (trust auth), preinstalled on python-svc
  # machines; start the cluster if it is installed but down. ORCH_TEST_PG points the tests elsewhere.
  if [ -n "${ORCH_TEST_PG:-}" ]; then return 0; fi
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then echo "postgresql: up"; return 0; fi
  if [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && { echo "postgresql: started"; return 0; }; sleep 1; done
  fi
  echo "postgresql: not reachable at 127.0.0.1:5432 (set ORCH_TEST_PG to a server URL)" >&2
  return 1
}

start() {
  local pkgs=()
  [ "${WITH_SLURM:-1}" = 1 ] && pkgs+=(slurm-wlm munge slurmdbd mariadb-server)
  [ "${WITH_BROWSER:-1}" = 1 ] && pkgs+=(chromium chromium-driver)
  [ "${#pkgs[@]}" -gt 0 ] && apt_install_missing "${pkgs[@]}" # one apt run for everything
  ensure_postgres
  if [ "${WITH_SLURM:-1}" = 1 ]; then
    SKIP_APT=1 bash "$HERE/slurm/start.sh"
  fi
  if [ "${WITH_BROWSER:-1}" = 1 ]; then
    echo "browser: $(chromium --version 2>/dev/null | head -1), $(chromedriver --version 2>/dev/null | cut -d' ' -f1-2)"
  fi
}

status() {
  if pgrep -x slurmctld >/dev/null; then
    echo "slurm: $(timeout 10 sinfo -h -o '%P %a %D %T' 2>&1 | head -1)"
  else
    echo "slurm: not running"
  fi
  command -v chromium >/dev/null && echo "browser: $(chromium --version 2>/dev/null | head -1)" || echo "browser: missing"
}

free_port() {
  "$REPO/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

mlflow_start() {
  local dir="${1:?usage: services.sh mlflow-start DIR [PORT] [BACKEND_URI]}"
  mkdir -p "$dir/artifacts"
  dir="$(cd "$dir" && pwd)"
  if [ -s "$dir/mlflow.pid" ] && kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null && [ -s "$dir/mlflow.url" ]; then
    echo "MLFLOW_TRACKING_URI=$(cat "$dir/mlflow.url")"
    return 0
  fi
  local port="${2:-$(free_port)}" backend="${3:-sqlite:///$dir/mlflow.db}"
  local url="http://127.0.0.1:$port"
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$REPO/.venv/bin/mlflow" server --host 127.0.0.1 --port "$port" \
    --workers 1 --backend-store-uri "$backend" --artifacts-destination "$dir/artifacts" \
    </dev/null >"$dir/mlflow.log" 2>&1 &
  echo $! >"$dir/mlflow.pid"
  for _ in $(seq 1 120); do
    if "$REPO/.venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=2)' "$url" 2>/dev/null; then
      echo "$url" >"$dir/mlflow.url"
      echo "MLFLOW_TRACKING_URI=$url"
      return 0
    fi
    kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null || break
    sleep 0.5
  done
  echo "mlflow server did not come up; last log lines:" >&2
  tail -20 "$dir/mlflow.log" >&2
  mlflow_stop "$dir"
  return 1
}

mlflow_stop() {
  local dir="${1:?usage: services.sh mlflow-stop DIR}" pid
  [ -s "$dir/mlflow.pid" ] || return 0
  pid="$(cat "$dir/mlflow.pid")"
  kill -TERM -- "-$pid" 2>/dev/null || true # setsid made it a process-group leader: its workers go too
  for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$dir/mlflow.pid" "$dir/mlflow.url"
}

cmd="${1:-start}"
shift || true
case "$cmd" in
  start)
    # one start at a time (parallel test sessions); -o: the daemons started must not inherit the lock
    flock -o /tmp/orch-services.lock bash "${BASH_SOURCE[0]}" start-locked
    ;;
  start-locked) start ;;
  stop) bash "$HERE/slurm/stop.sh" ;;
  status) status ;;
  mlflow-start) mlflow_start "$@" ;;
  mlflow-stop) mlflow_stop "$@" ;;
  *)
    echo "usage: $0 start|stop|status|mlflow-start DIR [PORT] [BACKEND_URI]|mlflow-stop DIR" >&2
    exit 2
    ;;
esac
