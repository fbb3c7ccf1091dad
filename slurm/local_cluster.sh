#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests of slurm/*.sbatch and `umt submit`.
#
#   bash slurm/local_cluster.sh start    install (Debian packages, as root) if missing, write the
#                                        config, start munged, slurmctld and slurmd; waits until
#                                        the node takes jobs. Idempotent: a running daemon is kept.
#   bash slurm/local_cluster.sh stop     stop the daemons that `start` started (and only those)
#   bash slurm/local_cluster.sh status   daemons, partition and node state; exit 0 when usable
#
# The node is this machine (`hostname -s`, its CPU count and memory); the partition is `debug`.
# Everything it writes outside /etc lives under $UMT_SLURM_STATE (default /var/lib/umt-slurm).
# It refuses to touch a slurm.conf it did not write, so it cannot break a real cluster's node.
set -euo pipefail

STATE=${UMT_SLURM_STATE:-/var/lib/umt-slurm}
CONF_DIR=/etc/slurm # where Debian's Slurm looks for slurm.conf
CONF=$CONF_DIR/slurm.conf
MARKER="# written by umt slurm/local_cluster.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)
PARTITION=debug
READY_TIMEOUT_S=60

say() { echo "local_cluster: $*" >&2; }
die() {
  say "$*"
  exit 1
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "Slurm is not installed (${missing[*]}) and installing needs root"
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get"
  say "installing ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "${PACKAGES[@]}" >&2
}

write_config() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching a real Slurm config"
  fi
  local host cpus mem_mb
  host=$(hostname -s)
  # slurmd -C reports what slurmd itself will detect; nproc is the fallback.
  cpus=$(slurmd -C 2>/dev/null | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -n 1)
  cpus=${cpus:-$(nproc --all)}
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/spool" "$STATE/log" "$STATE/run"
  cat >"$CONF.tmp" <<EOF
$MARKER: a one-node test cluster on $host.
ClusterName=umt-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Test every pending job each 2 s (default 60): a requeued or dependent job starts promptly.
SchedulerParameters=sched_interval=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Jobs may be requeued (sbatch --requeue; rank 0 runs scontrol requeue after a signal).
JobRequeue=1
ReturnToService=2
# Finished jobs stay visible to scontrol for the tests' polls (there is no slurmdbd/sacct).
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$CONF.tmp" "$CONF"; then
    rm -f "$CONF.tmp"
  else
    mv "$CONF.tmp" "$CONF"
    CONFIG_CHANGED=1
  fi
}

start_munge() {
  if pid_alive /run/munge/munged.pid; then
    return 0
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
  fi
  runuser -u munge -- munged
  touch "$STATE/run/started-munged"
}

start_daemon() { # name pidfile
  local name=$1 pidfile=$2
  if pid_alive "$pidfile"; then
    return 0
  fi
  "$name" # both daemonize and write their pid file
  touch "$STATE/run/started-$name"
}

wait_ready() {
  local deadline=$((SECONDS + READY_TIMEOUT_S)) state
  while [ $SECONDS -lt $deadline ]; do
    state=$(sinfo -h -p "$PARTITION" -o %T 2>/dev/null | head -n 1 || true)
    case "$state" in
    idle* | mixed* | alloc* | completing*) return 0 ;;
    down* | drain* | fail*) scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1 # waiting on the daemons (an external system), bounded by READY_TIMEOUT_S
  done
  die "the node did not become usable in ${READY_TIMEOUT_S}s (state: ${state:-none}); see $STATE/log/"
}

start() {
  install_packages
  [ "$(id -u)" -eq 0 ] || die "starting munged, slurmctld and slurmd needs root"
  CONFIG_CHANGED=0
  write_config
  start_munge
  if [ "$CONFIG_CHANGED" = 1 ] && pid_alive "$STATE/run/slurmctld.pid"; then
    scontrol reconfigure # running daemons take the new config
  fi
  start_daemon slurmctld "$STATE/run/slurmctld.pid"
  start_daemon slurmd "$STATE/run/slurmd.pid"
  wait_ready
  say "up: partition $PARTITION on $(hostname -s); logs in $STATE/log"
}

stop_pid() { # name pidfile
  local name=$1 pidfile=$2 pid
  [ -f "$STATE/run/started-$name" ] || return 0
  if pid_alive "$pidfile"; then
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 1 30); do # bounded wait for the daemon to exit
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$STATE/run/started-$name"
  say "stopped $name"
}

stop() {
  stop_pid slurmd "$STATE/run/slurmd.pid"
  stop_pid slurmctld "$STATE/run/slurmctld.pid"
  stop_pid munged /run/munge/munged.pid
}

status() {
  local ok=0
  for pair in "munged /run/munge/munged.pid" "slurmctld $STATE/run/slurmctld.pid" \
    "slurmd $STATE/run/slurmd.pid"; do
    set -- $pair
    if pid_alive "$2"; then echo "$1: running (pid $(cat "$2"))"; else
      echo "$1: not running"
      ok=1
    fi
  done
  sinfo 2>/dev/null || ok=1
  return $ok
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
*)
  echo "usage: $0 start|stop|status" >&2
  exit 2
  ;;
esac
