#!/usr/bin/env bash
# Stops what start.sh started, by the PIDs in its pid files (never by name): cancels the jobs
# left, then slurmd, slurmctld and (when start.sh started it) munged. Safe when nothing runs.
set -uo pipefail
source "$(dirname "$0")/common.sh"

stop_daemon() { # stop_daemon PIDFILE COMM
    local pid
    pid=$(live_pid "$1" "$2") || return 0
    say "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do live_pid "$1" "$2" >/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

if live_pid "$PIDS/slurmctld.pid" slurmctld >/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        say "cancelling jobs $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 50); do [ -z "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
fi
stop_daemon "$PIDS/slurmd.pid" slurmd
stop_daemon "$PIDS/slurmctld.pid" slurmctld
if [ -e "$PIDS/munged.ours" ]; then
    stop_daemon /run/munge/munged.pid munged
    rm -f "$PIDS/munged.ours"
fi
exit 0
