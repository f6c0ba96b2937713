#!/usr/bin/env bash
# A single-node Slurm 22.05 test cluster on 127.0.0.1 (Debian slurm-wlm), for the tests and for trying
# the job scripts locally.  `scripts/slurm_cluster.sh start DIR` writes DIR/slurm.conf, starts
# slurmctld + slurmd (as root) and waits until the node is idle; `stop DIR` kills both by pid;
# `env DIR` prints the SLURM_CONF export.  Two partitions make preemption real: `low` (default,
# requeued on preemption, 15 s grace) and `high`.
set -euo pipefail
cmd=${1:-}; dir=${2:-/tmp/megdet-slurm}
conf="$dir/slurm.conf"

stop() {
  for d in slurmd slurmctld; do
    if [ -f "$dir/$d.pid" ]; then
      pid=$(cat "$dir/$d.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/$d.pid"
    fi
  done
}

case "$cmd" in
start)
  command -v slurmctld >/dev/null || { echo "slurmctld not found: apt-get install slurm-wlm" >&2; exit 1; }
  stop
  rm -rf "$dir/state" "$dir/spool"
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  node=$(hostname -s)
  line=$(slurmd -C | head -n1)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$line")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
  mem=$(( mem * 9 / 10 ))
  cat > "$conf" <<CONF
ClusterName=megdet-test
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=pmix
JobRequeue=1
MailProg=/bin/true
ReturnToService=2
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=2
SlurmctldParameters=preempt_send_user_signal
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
KillWait=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=low Nodes=$node Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=15
PartitionName=high Nodes=$node MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
  export SLURM_CONF="$conf"
  slurmctld -f "$conf"
  slurmd -f "$conf"
  for _ in $(seq 100); do
    state=$(sinfo -h -N -o %T 2>/dev/null | head -n1 || true)
    case "$state" in idle*) echo "slurm test cluster up: export SLURM_CONF=$conf"; exit 0 ;; esac
    sleep 0.2
  done
  echo "slurm did not reach idle; see $dir/log" >&2
  exit 1
  ;;
stop) stop ;;
env) echo "export SLURM_CONF=$conf" ;;
*) echo "usage: $0 start|stop|env [DIR]" >&2; exit 2 ;;
esac
