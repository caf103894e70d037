# Shared by start.sh and stop.sh: where the local cluster lives and how a daemon is found.
# SLURM_LOCAL_DIR: its folder (config, state, spool, logs, pid files); default <repo>/.slurm-local.
SLURM_LOCAL_DIR=${SLURM_LOCAL_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.slurm-local}
CONF=$SLURM_LOCAL_DIR/etc/slurm.conf
PIDS=$SLURM_LOCAL_DIR/run
LOGS=$SLURM_LOCAL_DIR/log
export SLURM_CONF=$CONF

say() { echo "[slurm-local] $*" >&2; }
fail() { echo "[slurm-local] error: $*" >&2; exit 1; }

# live_pid FILE COMM: prints the pid in FILE when that process is alive, is COMM, and is not a
# zombie (a sandbox's init may reap late, and kill -0 succeeds on zombies).
live_pid() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
    echo "$pid"
}
