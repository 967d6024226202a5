#!/usr/bin/env bash
# Start a single-node Slurm (munge, MariaDB, slurmdbd, slurmctld, slurmd) on localhost, without systemd.
#
#   ci/slurm/setup.sh            install (if needed), configure, start; idempotent
#   DMQ_SLURM_DIR=/path ...      scratch folder for state, spool, logs, pid files, the accounting DB
#   DMQ_SLURM_NO_INSTALL=1 ...   never call apt-get (fail if a package is missing)
#
# The Slurm state folder and the accounting database live together under $DMQ_SLURM_DIR, so they
# are kept or wiped together (ci/slurm/teardown.sh --wipe). Needs root. Stop with ci/slurm/teardown.sh.
set -euo pipefail

D="${DMQ_SLURM_DIR:-/tmp/dmq-slurm}"
CLUSTER=dmq
HOST="$(hostname -s)"
log() { echo "[slurm-setup] $*"; }

if [ "$(id -u)" != 0 ]; then
  echo "[slurm-setup] needs root (starts daemons, writes /etc/slurm)" >&2
  exit 3
fi

if timeout 5 sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  # Up is not enough: submitit needs accounting (sacct) too, or a dead job's wait never ends.
  if timeout 10 sacct -n -X -o JobID >/dev/null 2>&1; then
    log "Slurm already up: $(sinfo -h -N -o '%N %T' | tr '\n' ' ')"
    exit 0
  fi
  log "Slurm is up but accounting does not answer: restarting it"
  bash "$(dirname "$0")/teardown.sh" || true
fi

need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge slurmdbd:slurmdbd mariadbd:mariadb-server; do
  bin=${pair%%:*}; pkg=${pair#*:}
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "${DMQ_SLURM_NO_INSTALL:-0}" = 1 ]; then
    echo "[slurm-setup] missing packages: ${need[*]} (and DMQ_SLURM_NO_INSTALL=1)" >&2
    exit 4
  fi
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null
    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge slurmdbd mariadb-server >/dev/null
  }
fi

mkdir -p "$D"/{state,spool,log,run}
chmod 755 "$D"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# --- munge ---------------------------------------------------------------------------------------
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || { log "creating munge key"; mungekey --create 2>/dev/null || /usr/sbin/mungekey -c; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null
cp /run/munge/munged.pid "$D/run/munged.pid" 2>/dev/null || pgrep -x munged | head -1 > "$D/run/munged.pid"

# --- MariaDB (accounting database, in the scratch folder) ----------------------------------------
DB="$D/mysql"
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
if [ ! -d "$DB/mysql" ]; then
  log "initialising MariaDB in $DB"
  mkdir -p "$DB" && chown mysql:mysql "$DB"
  mariadb-install-db --user=mysql --datadir="$DB" --auth-root-authentication-method=socket >"$D/log/mariadb-install.log" 2>&1
fi
mkdir -p "$D/mysql-run" && chown mysql:mysql "$D/mysql-run"
if ! alive "$D/mysql-run/mariadb.pid"; then
  log "starting MariaDB"
  /usr/sbin/mariadbd --user=mysql --datadir="$DB" --socket=/run/mysqld/mysqld.sock \
    --pid-file="$D/mysql-run/mariadb.pid" --bind-address=127.0.0.1 --port=3306 \
    --log-error="$D/mysql-run/mariadb.log" --innodb-buffer-pool-size=64M >/dev/null 2>&1 &
  for _ in $(seq 300); do mariadb -S /run/mysqld/mysqld.sock -e 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
  mariadb -S /run/mysqld/mysqld.sock -e 'select 1' >/dev/null 2>&1 || {
    echo "[slurm-setup] MariaDB did not start; see $D/mysql-run/mariadb.log" >&2; tail -5 "$D/mysql-run/mariadb.log" >&2; exit 5; }
fi
mariadb -S /run/mysqld/mysqld.sock -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdb';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

# --- configuration -------------------------------------------------------------------------------
CPUS=$(nproc)
MEM_FREE=$(free -m | awk '/^Mem:/ {print int($2 * 0.8)}')
MEM_SLURMD=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
MEM=$MEM_FREE
[ -n "$MEM_SLURMD" ] && [ "$MEM_SLURMD" -lt "$MEM" ] && MEM=$MEM_SLURMD
mkdir -p /etc/slurm
cat > /etc/slurm/slurm.conf <<CONF
# written by dmqbench ci/slurm/setup.sh (scratch: $D)
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
SchedulerParameters=sched_interval=1
MinJobAge=300
KillWait=5
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$D/run/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmdb
StorageLoc=slurm_acct_db
CONF
chmod 600 /etc/slurm/slurmdbd.conf
echo "$D" > /etc/slurm/.dmqbench-scratch

# --- daemons -------------------------------------------------------------------------------------
if ! alive "$D/run/slurmdbd.pid"; then
  log "starting slurmdbd"
  slurmdbd
  for _ in $(seq 100); do sacctmgr -n -P list cluster >/dev/null 2>&1 && break; sleep 0.2; done
fi
sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
if ! alive "$D/run/slurmctld.pid"; then
  log "starting slurmctld"
  slurmctld
fi
if ! alive "$D/run/slurmd.pid"; then
  log "starting slurmd"
  slurmd
fi
for _ in $(seq 150); do
  state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)
  case "$state" in idle|mixed|allocated) break ;; esac
  sleep 0.2
done
state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)
case "$state" in
  idle|mixed|allocated) log "Slurm up: node $HOST ($CPUS CPUs, ${MEM} MB) $state; scratch $D" ;;
  *) echo "[slurm-setup] node did not come up (state: '${state}'); logs in $D/log" >&2
     scontrol show node "$HOST" 2>&1 | grep -i reason >&2 || true
     exit 5 ;;
esac
