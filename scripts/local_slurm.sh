#!/usr/bin/env bash
# A real single-node Slurm cluster on localhost (munged + slurmctld + slurmd), for the `slurm` pytest marker and
# for trying hydra/launcher=slurm without a cluster. Made for root in a container (no systemd, no cgroup
# delegation), e.g. Debian 12 CI images; a non-root caller is re-run through sudo.
#   usage: bash scripts/local_slurm.sh install|start|stop|restart|status|env
#   eval "$(bash scripts/local_slurm.sh start)"   # start prints `export SLURM_CONF=...` (the only stdout line)
# Everything lives in one private state directory, ${LOCAL_SLURM_DIR:-/tmp/unified_train_slurm}: slurm.conf,
# the munge key and socket, spool/state dirs, logs, pid files. Nothing under /etc is read or written (install
# aside), so a system Slurm or munge, if any, is left alone; every client (sbatch, srun, sinfo, squeue, scancel)
# finds this cluster only through SLURM_CONF=$STATE/slurm.conf, which the jobs inherit.
# Knobs: LOCAL_SLURM_CPUS (CPUs the node offers, default max(nproc, 2)), LOCAL_SLURM_CTLD_PORT /
# LOCAL_SLURM_SLURMD_PORT (6817 / 6818), LOCAL_SLURM_WAIT (seconds start waits for the node, 60).
#
# Why the non-obvious slurm.conf settings (see write_config):
#   AuthInfo=socket=...        our own munged on a private socket with a private key: no /etc/munge, no
#                              /run/munge, no clash with a system munged (munge is a hard dependency anyway).
#   SlurmctldHost=H(127.0.0.1), NodeAddr=127.0.0.1
#                              the names are the real `hostname -s` (slurmd identifies itself by it); the daemons
#                              reach each other over loopback whatever the hostname resolves to.
#   SlurmUser/SlurmdUser=root  no slurm user or chown needed; jobs still run as the submitting user.
#   ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, JobAcctGatherType=jobacct_gather/none
#                              none of them touches cgroups (a container has no writable cgroup tree); linuxproc
#                              tracks a step's processes through /proc parentage, so scancel still kills them.
#   no cgroup.conf             22.05 needs none with these plugins (checked: slurmd starts and runs steps without
#                              one). Slurm >= 24.05 gets one with CgroupPlugin=disabled (the value only exists
#                              from 24.05 on), so a newer slurmd does not go looking for a cgroup tree either.
#   AccountingStorageType=accounting_storage/none, JobCompType=jobcomp/none
#                              no slurmdbd/database. Consequence: `sacct` fails; submitit only logs "Bypassing
#                              sacct error" and tracks jobs through its result pickles (a job killed before it
#                              writes one stays UNKNOWN and is waited on forever: give such tests a timeout).
#   SelectType=select/cons_tres, SelectTypeParameters=CR_CPU
#                              CPUs are the consumable resource (memory is not), so several jobs share the node.
#   CPUs=max(nproc,2) + SlurmdParameters=config_overrides
#                              a 2-task x 1-CPU step must fit even on a 1-CPU runner; config_overrides stops slurmd
#                              draining the node when the declared CPUs/memory exceed what it detects.
#   SchedulerParameters=batch_sched_delay=0
#                              the default lets batch jobs wait up to 3 s for the scheduler; with 0 a queued array
#                              element starts within ~1 s of the previous one ending.
#   ReturnToService=2          a node that was DOWN (e.g. unexpected reboot of slurmd) comes back on registration.
#   MpiDefault=none            srun starts plain processes; torch.distributed does its own rendezvous.
#   PlugStackConfig=<empty file>
#                              ignore SPANK plugins of the host's /etc/slurm (pyxis etc.).
#   MailProg=/bin/true         no mail program in a container; silences slurmctld's complaint.
#   slurmctld -c               start from a clean state every time (stale jobs of a killed cluster do not come
#                              back); job ids still keep counting up from the previous run.
set -euo pipefail

STATE=${LOCAL_SLURM_DIR:-/tmp/unified_train_slurm}
CONF=$STATE/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket.2
CTLD_PORT=${LOCAL_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${LOCAL_SLURM_SLURMD_PORT:-6818}
WAIT_S=${LOCAL_SLURM_WAIT:-60}
NODE=$(hostname -s)
export SLURM_CONF=$CONF  # our own client calls (sinfo, squeue, scancel) and the daemons' children use this cluster
PATH=$PATH:/usr/sbin:/sbin

log() { echo "local_slurm: $*" >&2; }
die() { echo "local_slurm: error: $*" >&2; exit 1; }
# The last lines of a log on one line, for die messages.
log_tail() {  # $1 log, $2 lines (3); timestamps dropped
  [[ -s $1 ]] && tail -n "${2:-3}" "$1" | sed 's/^\[[^]]*\] *//; s/^[0-9-]* [0-9:]* [+0-9]* *//' | tr '\n' ' ' |
    sed 's/  */ /g; s/ $//' || echo "(empty log $1)"
}

as_root() {  # re-run this script as root (SlurmdUser=root must be able to switch to the job's user)
  if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null || die "must run as root (and sudo is not available)"
    exec sudo --preserve-env=LOCAL_SLURM_DIR,LOCAL_SLURM_CPUS,LOCAL_SLURM_CTLD_PORT,LOCAL_SLURM_SLURMD_PORT,LOCAL_SLURM_WAIT \
      bash "$0" "$@"
  fi
}

# Alive = exists and is not a zombie (an init that does not reap, as in some containers, leaves killed daemons
# as zombies whose /proc entries stay).
alive() { local st; st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) && [[ -n $st && ${st:0:1} != Z ]]; }

# pid from a pid file if that process is alive and is the expected program, else nothing (stale files removed).
live_pid() {  # $1 pid file, $2 program name
  local pid
  [[ -f $1 ]] || return 0
  pid=$(tr -dc '0-9' <"$1")
  if [[ -n $pid ]] && alive "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2"* ]]; then
    echo "$pid"
  else
    rm -f "$1" 2>/dev/null || true
  fi
}

STOP_SIGNAL=TERM  # KILL when tearing down a broken start: a slurmd without controller takes ~10 s to obey TERM
stop_pids() {  # pid-file/program pairs: $STOP_SIGNAL to all at once, wait up to 10 s, then SIGKILL
  local pids=() pid i any
  while (($# >= 2)); do
    pid=$(live_pid "$1" "$2")
    [[ -n $pid ]] && pids+=("$pid") && kill -"$STOP_SIGNAL" "$pid" 2>/dev/null || true
    rm -f "$1"
    shift 2
  done
  for ((i = 0; i < 100; i++)); do
    any=0
    for pid in "${pids[@]}"; do alive "$pid" && any=1; done
    ((any)) || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    alive "$pid" && log "pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) ignored SIGTERM; killing it" &&
      kill -KILL "$pid" 2>/dev/null || true
  done
}

cmd_install() {
  local bin missing=0
  for bin in slurmctld slurmd sbatch srun sinfo squeue scancel munged; do
    command -v "$bin" >/dev/null || missing=1
  done
  if ((missing == 0)); then
    log "slurm already installed ($(slurmd -V 2>/dev/null))"
    return 0
  fi
  as_root install
  command -v apt-get >/dev/null || die "slurm is missing and there is no apt-get to install it"
  # The packages' postinst would start the system slurmctld (which fails without /etc/slurm/slurm.conf and
  # aborts the install) and munge: forbid service starts for the duration, as Docker images do.
  local policy=/usr/sbin/policy-rc.d aptlog=/tmp/local_slurm_apt.log
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
    # shellcheck disable=SC2064  # expanded now on purpose
    trap "rm -f $policy" EXIT
  fi
  log "installing slurm-wlm with apt-get (log: $aptlog)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends slurm-wlm >"$aptlog" 2>&1; then
    apt-get update -q >>"$aptlog" 2>&1 || true  # lists missing or stale (fresh CI image)
    apt-get install -y -q --no-install-recommends slurm-wlm >>"$aptlog" 2>&1 ||
      die "apt-get install slurm-wlm failed: $(log_tail "$aptlog" 3)"
  fi
  log "installed $(slurmd -V)"
}

write_config() {
  local cpus mem hw
  hw=$(slurmd -C 2>/dev/null | head -n 1 || true)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  [[ -n $cpus ]] || cpus=$(nproc)
  [[ -n $mem ]] || mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024))
  ((cpus >= 2)) || cpus=2
  cpus=${LOCAL_SLURM_CPUS:-$cpus}

  mkdir -p "$STATE"/{ctld,slurmd,log,run,munge,tmp}
  chmod 755 "$STATE" "$STATE"/{log,run,munge}  # non-root clients must reach the conf and the munge socket
  chmod 700 "$STATE"/{ctld,slurmd}
  chmod 1777 "$STATE/tmp"
  : >"$STATE/plugstack.conf"
  # 22.05 (bookworm) loads no cgroup plugin with these settings and needs no cgroup.conf; "disabled" is only
  # accepted from 24.05 on (an unknown value would be fatal on older versions).
  rm -f "$STATE/cgroup.conf"
  if [[ $(slurmd -V | awk '{split($2, v, "."); print (v[1] * 100 + v[2] >= 2405) ? "new" : "old"}') == new ]]; then
    echo "CgroupPlugin=disabled" >"$STATE/cgroup.conf"
  fi
  cat >"$CONF.tmp" <<EOF
# Written by scripts/local_slurm.sh (see the comments there for why each setting); rewritten on every start.
ClusterName=unified_train_local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$STATE/plugstack.conf
TmpFS=$STATE/tmp
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  chmod 644 "$CONF.tmp" "$STATE/plugstack.conf"
  mv -f "$CONF.tmp" "$CONF"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1 || true; }

healthy() {  # the controller answers and our node takes jobs
  # (without a live slurmctld, sinfo would retry for ~10 s before giving up)
  [[ -f $CONF && -n $(live_pid "$STATE/run/slurmctld.pid" slurmctld) ]] || return 1
  [[ $(node_state) =~ ^(idle|mixed|allocated|completing) ]]
}

start_munged() {
  local key=$STATE/munge/munge.key
  [[ -n $(live_pid "$STATE/run/munged.pid" munged) ]] && return 0
  if [[ ! -s $key ]]; then
    (umask 077 && dd if=/dev/urandom of="$key" bs=1024 count=1 status=none)
  fi
  chmod 400 "$key"
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  munged --key-file="$key" --socket="$MUNGE_SOCKET" --pid-file="$STATE/run/munged.pid" \
    --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed" ||
    die "munged failed to start: $(log_tail "$STATE/log/munged.log")"
}

# A failed start takes down what it started (ports, munged) but keeps the logs that the message points to.
start_failed() { STOP_SIGNAL=KILL cmd_stop quiet >/dev/null 2>&1 || true; die "$1"; }

cmd_start() {
  local t0 deadline launched st name
  for name in slurmctld slurmd munged sinfo; do
    command -v "$name" >/dev/null || die "$name not found; run: bash $0 install"
  done
  t0=$(date +%s.%N)
  deadline=$(($(date +%s) + WAIT_S))
  if healthy && [[ -n $(live_pid "$STATE/run/slurmd.pid" slurmd) ]]; then
    log "already running (state in $STATE)"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  STOP_SIGNAL=KILL cmd_stop quiet  # half-started or stale daemons/pid files of an earlier run (state is cleared anyway)
  write_config
  start_munged
  : >"$STATE/log/slurmctld.log"
  : >"$STATE/log/slurmd.log"
  # Both daemonize once their config is read; the parent's exit status covers config errors.
  slurmctld -f "$CONF" -c || start_failed "slurmctld failed to start: $(log_tail "$STATE/log/slurmctld.log")"
  slurmd -f "$CONF" -N "$NODE" || start_failed "slurmd failed to start: $(log_tail "$STATE/log/slurmd.log")"
  launched=$(date +%s)
  while :; do
    # a daemon that dies after forking (port in use, munge trouble) has no live process behind its pid file
    # (which the forked daemon writes a moment after the launcher returns, hence the grace second)
    for name in slurmctld slurmd; do
      if [[ -z $(live_pid "$STATE/run/$name.pid" "$name") ]] && (($(date +%s) > launched + 1)); then
        start_failed "$name exited during startup: $(log_tail "$STATE/log/$name.log")"
      fi
    done
    st=
    [[ -n $(live_pid "$STATE/run/slurmctld.pid" slurmctld) ]] && st=$(node_state)  # sinfo waits ~10 s for a dead one
    [[ $st == idle* ]] && break
    [[ $st == drain* || $st == fail* ]] &&
      start_failed "node $NODE is $st: $(sinfo -h -R -o '%E' 2>/dev/null | head -n 1)"
    (($(date +%s) < deadline)) ||
      start_failed "node $NODE not idle after ${WAIT_S}s (state '${st:-no answer}'): slurmctld: $(log_tail "$STATE/log/slurmctld.log" 2) slurmd: $(log_tail "$STATE/log/slurmd.log" 2)"
    sleep 0.2
  done
  log "up in $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $t0}")s: $(slurmd -V), node $NODE ($(sinfo -h -o '%c CPUs, %m MB')), partition debug; state in $STATE"
  echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
  local quiet=${1:-} ids i pid steps=() tree
  [[ -d $STATE ]] || { [[ -n $quiet ]] || log "not running (no $STATE)"; return 0; }
  # Cancel the jobs first: with proctrack/linuxproc, killing slurmd would leave the job steps running.
  if [[ -n $(live_pid "$STATE/run/slurmctld.pid" slurmctld) ]]; then
    ids=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [[ -n ${ids// /} ]]; then
      log "cancelling jobs: $ids"
      # shellcheck disable=SC2086
      scancel $ids 2>/dev/null || true
      for ((i = 0; i < 75; i++)); do
        [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
        sleep 0.2
      done
    fi
  fi
  stop_pids "$STATE/run/slurmd.pid" slurmd "$STATE/run/slurmctld.pid" slurmctld
  # Job steps still alive (scancel timed out, or the daemons were killed): our slurmstepd processes carry our
  # SLURM_CONF (inherited from slurmd); kill each with its whole process tree (the job's tasks).
  while read -r pid; do
    alive "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == slurmstepd ]] && steps+=("$pid")
  done < <(grep -l -z -x -F "SLURM_CONF=$CONF" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3)
  if ((${#steps[@]})); then
    tree=$(ps -e -o pid=,ppid= | awk -v roots="${steps[*]}" '
      BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
      { parent[$1] = $2 }
      END { do { grew = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grew = 1 } } while (grew)
            for (p in keep) print p }')
    log "killing leftover job steps (pids ${tree//$'\n'/ })"
    # shellcheck disable=SC2086
    kill -KILL $tree 2>/dev/null || true
  fi
  stop_pids "$STATE/run/munged.pid" munged  # last: slurmd/slurmctld talk to it while shutting down
  rm -f "$STATE/run/"*.pid
  [[ -n $quiet ]] || log "stopped"
}

cmd_status() {
  if [[ -f $CONF && -n $(live_pid "$STATE/run/slurmctld.pid" slurmctld) ]] && sinfo >/dev/null 2>&1; then
    sinfo
    squeue
    return 0
  fi
  log "cluster does not answer (SLURM_CONF=$CONF)"
  return 1
}

case ${1:-} in
  install) cmd_install ;;
  start) as_root start && cmd_start ;;
  stop) as_root stop && cmd_stop ;;
  restart) as_root restart && cmd_stop && cmd_start ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: bash $0 install|start|stop|restart|status|env" ;;
esac
