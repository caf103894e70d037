#!/usr/bin/env bash
# Starts a single-node Slurm (munged, slurmctld, slurmd) for rpt-flow's cluster tests, without
# systemd, as root. Installs Debian's packages when missing. Safe to run again: live daemons are
# kept. Prints `export SLURM_CONF=...` on success; `stop.sh` stops what this started, by PID.
#
# Why each step is there (measured on Debian 12, Slurm 22.05): munged refuses a key or state
# folder others can read and must run as user munge; the daemons fork and exit 0 even when they
# die on a config error, so we wait on pid files and sinfo; an `idle` node does not prove slurmd
# is up, so we also wait for its registration; batch_sched_delay=0 makes each dependency step
# take ~1 s instead of ~3 s; without accounting there is no sacct, so finished jobs are kept in
# squeue for an hour (MinJobAge) and logged to jobcomp.log.
set -euo pipefail
source "$(dirname "$0")/common.sh"
[ "$(id -u)" = 0 ] || fail "run as root (the daemons run as root here)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    say "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
mkdir -p "$SLURM_LOCAL_DIR"/{etc,state,spool} "$LOGS" "$PIDS"

# munge: key and folders owned by munge with strict modes.
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key --force 2>/dev/null \
        || head -c 1024 /dev/urandom >/etc/munge/munge.key
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
chmod 700 /etc/munge /var/log/munge; chmod 400 /etc/munge/munge.key; chmod 755 /run/munge; chmod 711 /var/lib/munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if live_pid /run/munge/munged.pid munged >/dev/null && munge_ok; then
    say "munged is running"
else
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged
    touch "$PIDS/munged.ours"
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || fail "munged does not answer (see /var/log/munge/munged.log)"
fi

# slurm.conf for this host: its short name, the hardware slurmd detects, 90 % of its memory (a
# node declaring more than slurmd finds is drained).
host=$(hostname -s)
hw=$(slurmd -C | head -1)
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
topology=$(tr ' ' '\n' <<<"$hw" | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
cat >"$CONF.new" <<CONF
# Written by rpt-flow's scripts/slurm-local/start.sh
ClusterName=rptflow-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGS/jobcomp.log
MinJobAge=3600
ReturnToService=2
DependencyParameters=kill_invalid_depend
StateSaveLocation=$SLURM_LOCAL_DIR/state
SlurmdSpoolDir=$SLURM_LOCAL_DIR/spool
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host ${topology}RealMemory=$(( ${mem:-1024} * 9 / 10 )) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
changed=0
if cmp -s "$CONF.new" "$CONF"; then rm "$CONF.new"; else mv "$CONF.new" "$CONF"; changed=1; fi
chmod 755 "$SLURM_LOCAL_DIR" "$SLURM_LOCAL_DIR/etc"; chmod 644 "$CONF"
# Client commands in jobs and shells find the config without SLURM_CONF (unless a real one is there).
mkdir -p /etc/slurm
if [ -L /etc/slurm/slurm.conf ] || [ ! -e /etc/slurm/slurm.conf ]; then ln -sfn "$CONF" /etc/slurm/slurm.conf; fi

if live_pid "$PIDS/slurmctld.pid" slurmctld >/dev/null; then
    say "slurmctld is running"
    if [ "$changed" = 1 ]; then scontrol reconfigure || true; fi
else
    slurmctld -f "$CONF"
fi
slurmd_since=0
if live_pid "$PIDS/slurmd.pid" slurmd >/dev/null; then
    say "slurmd is running"
else
    slurmd_since=$(date +%s)
    slurmd -f "$CONF"
fi

registered() {
    [ "$slurmd_since" = 0 ] && return 0
    local t
    t=$(scontrol show node "$host" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
    [ -n "$t" ] && [ "$t" != None ] && [ "$(date -d "$t" +%s 2>/dev/null || echo 0)" -ge $(( slurmd_since - 1 )) ]
}
for i in $(seq 240); do
    if [ "$i" -gt 20 ]; then
        live_pid "$PIDS/slurmctld.pid" slurmctld >/dev/null || fail "slurmctld died (see $LOGS/slurmctld.log)"
        live_pid "$PIDS/slurmd.pid" slurmd >/dev/null || fail "slurmd died (see $LOGS/slurmd.log)"
    fi
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -1 || true)
    case $state in
        idle | mixed | allocated) if registered; then say "node $host is $state"; echo "export SLURM_CONF=$CONF"; exit 0; fi ;;
        down* | drain* | fail*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.25
done
sinfo -R >&2 || true
fail "node $host is not ready after 60 s (state '$state'); see $LOGS"
