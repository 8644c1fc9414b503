#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests and local trials.
#
#   dev/minicluster.sh up     [DIR]   start (or re-check) the cluster; last stdout line: export SLURM_CONF=...
#   dev/minicluster.sh down   [DIR]   cancel its jobs and stop its daemons (munged is left alone)
#   dev/minicluster.sh status [DIR]   daemons, sinfo, squeue
#   dev/minicluster.sh logs   [DIR]   tail of the daemon logs
#
# DIR defaults to /tmp/vit-minicluster. Everything the cluster writes lives in DIR.
# Progress goes to stderr so that `eval "$(dev/minicluster.sh up)"` works.
#
# Environment knobs:
#   MINICLUSTER_TIMEOUT    seconds `up` waits for the nodes (default 60)
#   MINICLUSTER_LOG_LINES  lines per log for `logs` and failure reports (default 200)
#
# Slurm 22.05 facts that shape this file:
#   * requeued jobs stay PENDING with Reason=BeginTime for AuthInfo cred_expire
#     (120 s by default); tests release them with `scontrol update JobId=N StartTime=now`.
#   * with preempt_send_user_signal, a preempted job gets its --signal at once; if it
#     then exits on its own within GraceTime Slurm records it COMPLETED, it is only
#     requeued by Slurm if it is still running when GraceTime ends.
set -euo pipefail

CMD="${1:-}"
DIR="${2:-/tmp/vit-minicluster}"
TIMEOUT="${MINICLUSTER_TIMEOUT:-60}"
LOG_LINES="${MINICLUSTER_LOG_LINES:-200}"

# Fixed, unusual ports so we never collide with a system slurm (6817/6818).
CTLD_PORT=16817
SLURMD_PORTS="17001-17002"
NODES=(node1 node2)
NODELIST="node[1-2]"

log() { printf 'minicluster: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ -n "$CMD" ]] || usage
# slurm.conf has no quoting for paths, so a DIR with whitespace cannot work.
[[ "$DIR" =~ [[:space:]] ]] && die "DIR must not contain whitespace: '$DIR'"
DIR="$(realpath -m -- "$DIR")"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"
# A caller inside a Slurm job would otherwise leak its job context into our commands.
while IFS= read -r var; do
    [[ "$var" == SLURM_CONF ]] || unset "$var"
done < <(compgen -e | grep -E '^(SLURM|SLURMD|SRUN|SBATCH|SALLOC)_' || true)

# Daemons live in sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

CTLD_PIDFILE="$DIR/run/slurmctld.pid"
slurmd_pidfile() { printf '%s/run/slurmd-%s.pid' "$DIR" "$1"; }

# ---------------------------------------------------------------------------
# process helpers

# Prints the pid from a pid file if that process is alive and really is NAME
# (pid files can outlive their process and the pid can be reused).
live_pid() {
    local pidfile="$1" name="$2" pid comm
    [[ -f "$pidfile" ]] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [[ -n "$pid" ]] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ "$comm" == "$name" ]] || return 1
    printf '%s' "$pid"
}

# slurmstepd processes survive their slurmd; find the ones of this cluster by the
# files under DIR they keep open (the slurmd log), so `down` never touches
# another cluster's jobs.
stepd_pids() {
    local p
    for p in /proc/[0-9]*; do
        [[ "$(cat "$p/comm" 2>/dev/null)" == slurmstepd ]] || continue
        if find "$p/fd" -maxdepth 1 -lname "$DIR/*" 2>/dev/null | grep -q .; then
            printf '%s\n' "${p#/proc/}"
        fi
    done
}

# Sends TERM, waits up to 10 s, then KILL.
stop_pid() {
    local pid="$1" what="$2" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || { log "stopped $what (pid $pid)"; return 0; }
        sleep 0.2
    done
    log "$what (pid $pid) ignored SIGTERM, killing"
    kill -KILL "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------------------
# installation and munge

ensure_packages() {
    local c missing=()
    for c in slurmctld slurmd sbatch srun scontrol sinfo squeue scancel munged munge unmunge; do
        command -v "$c" >/dev/null 2>&1 || missing+=("$c")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ "$(id -u)" == 0 ]] || die "missing ${missing[*]} and not root; run: apt-get install -y slurm-wlm munge"
    log "installing slurm-wlm and munge (apt; missing: ${missing[*]})"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2
    command -v slurmctld >/dev/null || die "slurmctld still missing after apt-get install"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ensure_munge() {
    munge_ok && return 0
    # Without systemd (containers, CI) nothing has prepared munge's directories.
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
        chmod 0400 /etc/munge/munge.key
    fi
    # munge -n failed, so any munged still around is useless (or a zombie that
    # pgrep would still report); start a fresh one. --force: tolerate the loose
    # log-dir ownership and a stale socket found on fresh or crashed machines.
    log "starting munged"
    munged --force >&2 || die "munged failed to start; see /var/log/munge/munged.log"
    local i
    for ((i = 0; i < 50; i++)); do
        munge_ok && return 0
        sleep 0.2
    done
    die "munge -n | unmunge fails; munged is not usable"
}

# ---------------------------------------------------------------------------
# configuration

write_conf() {
    local host cpus mem_mb real_mem tmp
    host="$(hostname -s)"
    cpus="$(nproc)"
    ((cpus >= 2)) || cpus=2
    # Modest memory so the node definition also fits small CI machines;
    # config_overrides below keeps slurmd from draining a node whose hardware
    # looks smaller than the definition.
    mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
    real_mem=8000
    ((mem_mb / 2 < real_mem)) && real_mem=$((mem_mb / 2))
    ((real_mem >= 1000)) || real_mem=1000

    mkdir -p "$DIR"/{state,run,log,spool/node1,spool/node2}
    tmp="$(mktemp "$DIR/.slurm.conf.XXXXXX")"
    cat >"$tmp" <<EOF
# Generated by dev/minicluster.sh; edits are overwritten by the next "up".
ClusterName=vitmini
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root

StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool/%n
SlurmctldPidFile=${CTLD_PIDFILE}
SlurmdPidFile=${DIR}/run/slurmd-%n.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups: works in unprivileged containers and needs no cgroup.conf.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
# The default /usr/bin/mail does not exist here and slurmctld logs an error for it.
MailProg=/bin/true
SlurmdParameters=config_overrides

SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Without a default, a job without --mem would claim the whole node's memory.
DefMemPerCPU=$((real_mem / cpus))

# Event-driven scheduling plus short periodic passes: tests should not wait.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
JobRequeue=1
ReturnToService=2
# Finished jobs stay visible to "scontrol show job" for an hour (no slurmdbd here).
MinJobAge=3600
KillWait=30
MessageTimeout=10
InactiveLimit=0
Waittime=0

PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal

NodeName=${NODELIST} NodeHostname=${host} NodeAddr=127.0.0.1 Port=[${SLURMD_PORTS}] CPUs=${cpus} RealMemory=${real_mem} State=UNKNOWN
PartitionName=debug Nodes=${NODELIST} Default=YES PriorityTier=1 GraceTime=60 MaxTime=INFINITE OverSubscribe=NO State=UP
PartitionName=urgent Nodes=${NODELIST} PriorityTier=10 MaxTime=INFINITE OverSubscribe=NO State=UP
EOF
    if [[ -f "$CONF" ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 0
    fi
    if [[ -f "$CONF" ]] && live_pid "$CTLD_PIDFILE" slurmctld >/dev/null; then
        log "WARNING: slurm.conf changed while the cluster runs; run 'down' then 'up' to apply it"
    fi
    mv -f "$tmp" "$CONF"
    log "wrote $CONF"
}

# ---------------------------------------------------------------------------
# daemons

start_daemons() {
    local node args
    if live_pid "$CTLD_PIDFILE" slurmctld >/dev/null; then
        log "slurmctld already running (pid $(live_pid "$CTLD_PIDFILE" slurmctld))"
    else
        args=(-f "$CONF")
        # Clean state only on the very first start; later starts recover the job
        # table so job ids keep increasing and old jobs stay visible.
        if [[ ! -e "$DIR/state/job_state" ]]; then
            args+=(-c)
        fi
        log "starting slurmctld ${args[*]}"
        slurmctld "${args[@]}" || die "slurmctld failed to start; see $DIR/log/slurmctld.log"
    fi
    wait_ctld
    for node in "${NODES[@]}"; do
        if live_pid "$(slurmd_pidfile "$node")" slurmd >/dev/null; then
            log "slurmd $node already running"
        else
            log "starting slurmd -N $node"
            slurmd -f "$CONF" -N "$node" || die "slurmd $node failed to start; see $DIR/log/slurmd-$node.log"
        fi
    done
}

wait_ctld() {
    local deadline=$((SECONDS + TIMEOUT))
    until scontrol ping 2>/dev/null | grep -q 'is UP'; do
        if ((SECONDS >= deadline)); then
            print_logs
            die "slurmctld did not answer within ${TIMEOUT}s"
        fi
        sleep 0.5
    done
}

# Nodes count as ready when they respond and are not down/drained; a node
# busy with someone's job (mixed/allocated) is fine, so a second "up" never
# blocks on running work.
wait_nodes() {
    local deadline=$((SECONDS + TIMEOUT)) last_resume=0 node state ready
    while true; do
        ready=0
        local -a stuck=()
        while read -r node state; do
            case "$state" in
                idle | mixed | allocated | completing | planned) ready=$((ready + 1)) ;;
                # "*" = not responding: only slurmd registering can fix that.
                *'*') ;;
                down* | drain* | fail*) stuck+=("$node") ;;
            esac
        done < <(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u)
        ((ready == ${#NODES[@]})) && return 0
        # ReturnToService=2 revives down nodes when slurmd registers; drained
        # ones (e.g. after "Kill task failed") need an explicit resume.
        if ((${#stuck[@]} > 0 && SECONDS - last_resume >= 5)); then
            last_resume=$SECONDS
            for node in "${stuck[@]}"; do
                log "$node is not usable; resuming it"
                scontrol update nodename="$node" state=resume >&2 || true
            done
        fi
        if ((SECONDS >= deadline)); then
            sinfo -N -l >&2 || true
            scontrol show nodes >&2 || true
            print_logs
            die "nodes not ready within ${TIMEOUT}s"
        fi
        sleep 1
    done
}

print_logs() {
    local f
    for f in "$DIR/log/slurmctld.log" "$DIR"/log/slurmd-*.log; do
        [[ -f "$f" ]] || continue
        printf '===== %s (last %s lines) =====\n' "$f" "$LOG_LINES" >&2
        tail -n "$LOG_LINES" -- "$f" >&2
    done
}

# ---------------------------------------------------------------------------
# commands

cmd_up() {
    ensure_packages
    ensure_munge
    write_conf
    start_daemons
    wait_nodes
    log "cluster up: $(sinfo -h -N -o '%N=%T' | sort -u | tr '\n' ' ')"
    printf 'export SLURM_CONF=%s\n' "$CONF"
}

cmd_down() {
    local pid node i
    if [[ ! -d "$DIR" ]]; then
        log "nothing at $DIR"
        return 0
    fi
    if live_pid "$CTLD_PIDFILE" slurmctld >/dev/null && [[ -f "$CONF" ]]; then
        # Cancel jobs first so slurmd cleans up their processes; otherwise the
        # job steps outlive the daemons.
        if [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
            log "cancelling jobs"
            squeue -h -o %i | xargs -r scancel 2>/dev/null || true
            for ((i = 0; i < 30; i++)); do
                [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
                sleep 1
            done
        fi
    fi
    for node in "${NODES[@]}"; do
        if pid="$(live_pid "$(slurmd_pidfile "$node")" slurmd)"; then
            stop_pid "$pid" "slurmd $node"
        fi
        rm -f "$(slurmd_pidfile "$node")"
    done
    if pid="$(live_pid "$CTLD_PIDFILE" slurmctld)"; then
        stop_pid "$pid" slurmctld
    fi
    rm -f "$CTLD_PIDFILE"
    for pid in $(stepd_pids); do
        stop_pid "$pid" "leftover slurmstepd"
    done
    log "down ($DIR kept; delete it for a fresh start)"
}

cmd_status() {
    local node pid
    if pid="$(live_pid "$CTLD_PIDFILE" slurmctld)"; then echo "slurmctld: running (pid $pid)"; else echo "slurmctld: stopped"; fi
    for node in "${NODES[@]}"; do
        if pid="$(live_pid "$(slurmd_pidfile "$node")" slurmd)"; then echo "slurmd $node: running (pid $pid)"; else echo "slurmd $node: stopped"; fi
    done
    echo "SLURM_CONF=$CONF"
    # Without slurmctld, sinfo/squeue only retry for ~10 s and then fail.
    if live_pid "$CTLD_PIDFILE" slurmctld >/dev/null; then
        sinfo -N -l || true
        squeue -l || true
    fi
}

cmd_logs() {
    print_logs 2>&1
}

case "$CMD" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    logs) cmd_logs ;;
    -h | --help | help) usage ;;
    *) usage ;;
esac
