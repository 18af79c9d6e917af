#!/usr/bin/env bash
# Stop the SLURM daemons start.sh started, by the pids they wrote (never by name). MariaDB is left alone:
# on these machines it is a pre-started service (STOP_MARIADB=1 stops it, only if start.sh started it).
set -u
for f in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid /run/slurm/slurmdbd.pid; do
  [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null
done
sleep 2
[ -s /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null
if [ "${STOP_MARIADB:-0}" = 1 ] && [ -s /run/mysqld/mysqld.pid ]; then kill "$(cat /run/mysqld/mysqld.pid)"; fi
true
