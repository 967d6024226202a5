#!/usr/bin/env bash
# Stop what ci/slurm/setup.sh started (by the pids it recorded); --wipe also removes the scratch
# folder (Slurm state and accounting database together). Idempotent.
set -uo pipefail

D="${DMQ_SLURM_DIR:-$(cat /etc/slurm/.dmqbench-scratch 2>/dev/null || echo /tmp/dmq-slurm)}"
log() { echo "[slurm-teardown] $*"; }

stop() {  # name pidfile
  local name=$1 pf=$2 pid
  [ -s "$pf" ] || return 0
  pid=$(cat "$pf")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping $name ($pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "$name did not stop, SIGKILL"; kill -KILL "$pid" 2>/dev/null; }
  fi
  rm -f "$pf"
}

# cancel what is still queued, so nothing is left running under a stopped slurmd
command -v scancel >/dev/null 2>&1 && timeout 5 scancel --user=root >/dev/null 2>&1
stop slurmd "$D/run/slurmd.pid"
stop slurmctld "$D/run/slurmctld.pid"
stop slurmdbd "$D/run/slurmdbd.pid"
stop mariadb "$D/mysql-run/mariadb.pid"
stop munged "$D/run/munged.pid"

if [ "${1:-}" = "--wipe" ]; then
  log "wiping $D"
  rm -rf "$D"
fi
log "stopped"
