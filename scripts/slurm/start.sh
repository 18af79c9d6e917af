#!/usr/bin/env bash
# Bring up the one-node SLURM cluster the tests use (Debian bookworm slurm-wlm 22.05.8), loopback only, as root,
# with slurmdbd accounting on MariaDB so that `sacct` works (the SLURM launcher polls job states with sacct).
# Idempotent and fast when it already runs (one sinfo + one sacct, well under a second). Adapted from a recipe
# measured on these machines (cold start about 17 s with the apt install, warm 2 s).
#   WITH_DBD=0   no accounting (sacct is then disabled; the SLURM launcher needs it, tests will fail)
#   SKIP_APT=1   do not install missing packages (the caller did)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WITH_DBD="${WITH_DBD:-1}"
export DEBIAN_FRONTEND=noninteractive

# slurm.conf: the template with this machine's CPUs/memory from `slurmd -C`
render_conf() {
  local hw cpus mem conf
  hw="$(slurmd -C | head -1)"
  cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
  mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
  mem=$((mem > 2048 ? mem - 1024 : mem)) # slack, so the node never drains for "Low RealMemory"
  conf="$(sed -e "s/^NodeName=localhost .*/NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=${cpus} RealMemory=${mem} State=UNKNOWN/" "$HERE/slurm.conf")"
  if [ "$WITH_DBD" != 1 ]; then
    conf="$(sed -e 's|^AccountingStorageType=.*|AccountingStorageType=accounting_storage/none|' \
      -e '/^AccountingStorageHost=/d' -e '/^AccountingStoragePort=/d' <<<"$conf")"
  fi
  printf '%s\n' "$conf"
}

# ---- fast path: controller up, node usable, accounting answers (a changed template is applied in place)
if pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null; then
  node="$(timeout 10 sinfo -h -n localhost -o %T 2>/dev/null || true)"
  case "$node" in
    idle|mixed|allocated|completing)
      if [ "$WITH_DBD" != 1 ] || timeout 10 sacct -n -X -S now >/dev/null 2>&1; then
        if ! render_conf | cmp -s - /etc/slurm/slurm.conf; then
          render_conf >/etc/slurm/slurm.conf
          scontrol reconfigure
          echo "slurm: configuration updated"
        fi
        echo "slurm: running (node $node)"
        exit 0
      fi ;;
  esac
fi

if [ "${SKIP_APT:-0}" != 1 ]; then
  need_pkgs=(slurm-wlm munge)
  [ "$WITH_DBD" = 1 ] && need_pkgs+=(slurmdbd mariadb-server)
  missing=()
  for p in "${need_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

mkdir -p /run/slurm /run/munge /var/log/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /etc/slurm
chown munge:munge /run/munge
chmod 755 /run/munge

# ---- munge (the package's postinst makes the key; make one if absent)
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
fi

# ---- slurm.conf
render_conf >/etc/slurm/slurm.conf

# ---- accounting: MariaDB (reuse a running server) + slurmdbd
if [ "$WITH_DBD" = 1 ]; then
  if ! mariadb -e 'select 1' >/dev/null 2>&1; then
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql --bind-address=127.0.0.1
    for _ in $(seq 1 60); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.5; done
  fi
  # slurmdbd connects over TCP to 127.0.0.1: a server with skip-name-resolve matches that host, not 'localhost'
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
              CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  install -m 600 "$HERE/slurmdbd.conf" /etc/slurm/slurmdbd.conf
  if ! ss -ltn | grep -q ':6819 '; then
    pgrep -x slurmdbd >/dev/null || /usr/sbin/slurmdbd # one may be waiting for the database: it retries every 5 s
    for _ in $(seq 1 80); do ss -ltn | grep -q ':6819 ' && break; sleep 0.25; done
  fi
  if ! ss -ltn | grep -q ':6819 '; then
    echo "slurm: slurmdbd does not listen on 6819; last log lines:" >&2
    tail -5 /var/log/slurm/slurmdbd.log >&2
    exit 1
  fi
fi

# ---- controller and node daemon (slurmd -N localhost: the node is "localhost" whatever `hostname` says)
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
sleep 0.5
if ! pgrep -x slurmctld >/dev/null; then # e.g. "fatal: ... no TRES from it" when slurmdbd is down
  echo "slurm: slurmctld exited; last log lines:" >&2
  tail -5 /var/log/slurm/slurmctld.log >&2
  exit 1
fi
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd -N localhost

state=""
for _ in $(seq 1 60); do
  state="$(timeout 5 sinfo -h -n localhost -o %T 2>/dev/null || true)"
  [ "$state" = idle ] && break
  sleep 0.5
done
if [ "$state" != idle ]; then
  echo "slurm: node state '${state}', resuming it" >&2
  scontrol update nodename=localhost state=resume 2>/dev/null || true
fi
if [ "$WITH_DBD" = 1 ]; then # slurmctld registers the cluster in slurmdbd on its own; wait for sacct to answer
  for _ in $(seq 1 40); do sacct -n -X -S now >/dev/null 2>&1 && break; sleep 0.25; done
  sacct -n -X -S now >/dev/null || { echo "slurm: sacct does not answer (see /var/log/slurm/slurmdbd.log)" >&2; exit 1; }
fi
echo "slurm: started (node $(sinfo -h -n localhost -o %T))"
