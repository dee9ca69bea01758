#!/usr/bin/env bash
# A one-node Slurm cluster on 127.0.0.1 for `make slurm-test` (issue 26): munge + slurmctld + slurmd as root,
# no systemd, no cgroups, no accounting database. Everything lives under $SLURM_DIR; the clients find it
# through SLURM_CONF=$SLURM_DIR/slurm.conf.
#   scripts/slurm_cluster.sh start DIR    install slurm-wlm + munge if missing, write slurm.conf, start the daemons
#   scripts/slurm_cluster.sh stop DIR     stop the daemons this script started (by their pid files)
set -euo pipefail
action=$1
SLURM_DIR=$(realpath -m "$2")

start() {
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
    mkdir -p "$SLURM_DIR"/{state,spool,munge}
    chmod 755 "$SLURM_DIR"  # munged runs as the munge user
    chown munge:munge "$SLURM_DIR/munge"
    test -s /etc/munge/munge.key || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none;
                                      chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    runuser -u munge -- munged --socket="$SLURM_DIR/munge/munge.socket" --pid-file="$SLURM_DIR/munge/munged.pid" \
        --log-file="$SLURM_DIR/munge/munged.log" --seed-file="$SLURM_DIR/munge/munged.seed"
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    cat > "$SLURM_DIR/slurm.conf" <<CONF
ClusterName=loraqa
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SLURM_DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/slurmctld.log
SlurmdLogFile=$SLURM_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
NodeName=loraqa1 NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=loraqa1 Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF="$SLURM_DIR/slurm.conf"
    slurmctld -i
    # the jobs run at the lowest priority: this machine may be running other work
    nice -n 19 slurmd -N loraqa1
    for _ in $(seq 60); do
        sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && { sinfo; return 0; }
        sleep 0.5
    done
    echo "slurm-test: the node did not come up; logs in $SLURM_DIR" >&2
    tail -5 "$SLURM_DIR/slurmctld.log" "$SLURM_DIR/slurmd.log" >&2
    return 1
}

stop() {
    export SLURM_CONF="$SLURM_DIR/slurm.conf"
    scancel --full --user=root 2>/dev/null || true  # this cluster's jobs: their processes end before the daemons
    for _ in $(seq 30); do test -z "$(squeue -h 2>/dev/null)" && break; sleep 0.5; done
    for pid_file in "$SLURM_DIR/slurmd.pid" "$SLURM_DIR/slurmctld.pid" "$SLURM_DIR/munge/munged.pid"; do
        if test -s "$pid_file"; then kill "$(cat "$pid_file")" 2>/dev/null || true; fi
    done
}

"$action"
