#!/usr/bin/env bash
# A Slurm 22.05 test cluster on this one machine (Debian slurm-wlm), for the tests and for trying the
# job scripts locally.  Two modes:
#
#   start DIR                      one node on 127.0.0.1 (ports 16817/16818): slurmctld + slurmd.
#   start DIR --nodes N [--gpus-per-node G] [--cpus-per-node C]
#                                  N nodes, each in its own network + UTS + mount namespace: its own
#                                  address on a private bridge (10.218.X.0/24, X from DIR) that only
#                                  these namespaces use, its own hostname (node1..nodeN), /etc/hosts,
#                                  /dev/shm and PMIx directory (TmpFS); G fake GPUs per node (character
#                                  devices with /dev/null's numbers, declared as gres, so --gpus-per-task
#                                  jobs are scheduled and each task gets CUDA_VISIBLE_DEVICES); C
#                                  declared CPUs per node (default: this machine's).  slurmctld listens
#                                  on the bridge address, on a port derived from DIR (not 16817).
#   stop DIR                       ends every daemon and every process left in the nodes, removes the
#                                  namespaces, links and bridge (also after a failed or half-done start).
#   env DIR                        prints the SLURM_CONF export.
#   node DIR K kill|start|link-down|link-up|exec CMD...
#                                  faults for the tests: kill everything on nodeK (a lost node), start its
#                                  slurmd again, take its link down/up (an unreachable node), or run a
#                                  command inside it.
#
# Why namespaces and not containers: nothing to install beyond iproute2/util-linux, every daemon is
# the real one, and the nodes share the file system like a cluster's shared home.  Why nsenter +
# unshare and not `ip netns exec`: the latter remounts /sys, which hides /sys/fs/cgroup from slurmd.
# Two partitions make preemption real: `low` (default, requeued on preemption, 15 s grace) and `high`.
set -euo pipefail
cmd=${1:-}; dir=${2:-/tmp/megdet-slurm}
shift 2 2>/dev/null || shift $#
dir=$(realpath -m "$dir")
conf="$dir/slurm.conf"
state="$dir/cluster.env"  # what a multi-node start created, for stop and node (written first)

# Names and addresses of a multi-node cluster, a pure function of DIR (so stop finds them without state).
net_id=$(( $(printf %s "$dir" | cksum | cut -d' ' -f1) % 200 + 20 ))
bridge="mdbr$net_id"
subnet="10.218.$net_id"
ns_of() { echo "md$net_id-node$1"; }
veth_of() { echo "md${net_id}v$1"; }
ctl_port=$(( 17000 + 2 * net_id ))

stop_single() {
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

our_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^md$net_id-node[0-9]+$" || true; }

# Namespaces or a bridge of this DIR's net id without this DIR's state file belong to another cluster
# whose DIR hashes alike: never touch them.
foreign() { [ ! -f "$state" ] && { [ -n "$(our_namespaces)" ] || ip link show "$bridge" >/dev/null 2>&1; }; }

stop_multi() {
  if foreign; then return 0; fi
  # Every process of the cluster at once (one by one takes seconds per daemon): slurmctld, then all
  # that lives in a node's network namespace (slurmd, slurmstepd, job tasks).
  local pids="" namespaces
  namespaces=$(our_namespaces)
  # (slurmd pid files too: a node whose namespace was deleted under it is found by no `ip netns pids`.)
  # Only a pid whose command line names this cluster's slurm.conf (a stale pid file may name a reused pid).
  for f in "$dir/slurmctld.pid" "$dir"/run/slurmd.*.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline" | grep -qF -- "$conf" && pids="$pids $p"
  done
  for ns in $namespaces; do pids="$pids $(ip netns pids "$ns" 2>/dev/null || true)"; done
  pids=$(echo $pids)
  if [ -n "$pids" ]; then
    kill $pids 2>/dev/null || true  # TERM, 2 s, then KILL: nothing of a test cluster needs saving
    for _ in $(seq 20); do
      alive=""; for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
      [ -z "$alive" ] && break; sleep 0.1
    done
    [ -n "${alive:-}" ] && kill -9 $alive 2>/dev/null || true
  fi
  # Stragglers forked while we waited, then the namespaces (their veth ends go with them).
  for ns in $namespaces; do
    left=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -n "$left" ] && kill -9 $left 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  # Links of a start that failed before moving them into a namespace, and the bridge.
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^md${net_id}[vp][0-9]+$" || true); do
    ip link del "$link" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
  # `ip netns add` turns /run/netns into a mount point of its own; undo it once no namespace is left.
  if [ -n "$namespaces" ] && [ -z "$(ip netns list 2>/dev/null)" ] && mountpoint -q /run/netns; then
    umount /run/netns 2>/dev/null || true
  fi
  rm -f "$dir/slurmctld.pid" "$dir"/run/*.pid "$state"
}

write_common_conf() {  # $1 = controller host(address), $2 = ctl port, $3 = slurmd port
  cat > "$conf" <<CONF
ClusterName=megdet-test
SlurmctldHost=$1
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
SlurmctldPidFile=$dir/slurmctld.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmctldPort=$2
SlurmdPort=$3
CONF
}

wait_idle() {  # $1 = number of nodes
  export SLURM_CONF="$conf"
  for _ in $(seq 150); do
    idle=$(sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 ~ /^idle/' | sort -u | wc -l || true)
    if [ "$idle" -ge "$1" ]; then echo "slurm test cluster up ($1 node(s)): export SLURM_CONF=$conf"; return 0; fi
    sleep 0.1
  done
  echo "slurm did not reach idle; see $dir/log" >&2
  return 1
}

start_single() {
  rm -rf "$dir/state" "$dir/spool"
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  node=$(hostname -s)
  line=$(slurmd -C | head -n1)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$line")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
  mem=$(( mem * 9 / 10 ))
  write_common_conf "$node(127.0.0.1)" 16817 16818
  cat >> "$conf" <<CONF
SlurmdSpoolDir=$dir/spool
SlurmdPidFile=$dir/slurmd.pid
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=low Nodes=$node Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=15
PartitionName=high Nodes=$node MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
  export SLURM_CONF="$conf"
  slurmctld -f "$conf"
  slurmd -f "$conf"
  wait_idle 1
}

# Network namespace, veth into the bridge, address; idempotent for a node that already has them.
node_net() {
  local k=$1 ns veth
  ns=$(ns_of "$k"); veth=$(veth_of "$k")
  if ! ip netns list | awk '{print $1}' | grep -qx "$ns"; then
    ip netns add "$ns"
    ip link add "$veth" type veth peer name "md${net_id}p$k"
    ip link set "md${net_id}p$k" netns "$ns"
    ip -n "$ns" link set "md${net_id}p$k" name eth0
    ip -n "$ns" addr add "$subnet.$((10 + k))/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip link set "$veth" master "$bridge" up
  fi
}

# slurmd of nodeK inside its namespaces: own hostname, hosts file, resolv.conf, /dev/shm, TmpFS.  The
# mounts exist only in the node's private mount namespace and vanish with its last process.
node_slurmd() {
  local k=$1
  mkdir -p "$dir/spool/node$k" "$dir/nodes/node$k/tmp"
  nsenter --net="/run/netns/$(ns_of "$k")" unshare --uts --mount --propagation private bash -c "
    set -e
    hostname node$k
    mount --bind '$dir/hosts' /etc/hosts
    mount --bind '$dir/resolv.conf' /etc/resolv.conf
    mount -t tmpfs -o mode=1777 tmpfs /dev/shm
    mount --bind '$dir/nodes/node$k/tmp' '$dir/nodetmp'
    exec slurmd -f '$conf' -N node$k"
}

start_multi() {
  local nodes=$1 gpus=$2 cpus=$3
  [ "$nodes" -ge 1 ] && [ "$nodes" -le 100 ] || { echo "--nodes must be 1..100, got $nodes" >&2; exit 2; }
  [ "$gpus" -ge 0 ] && [ "$cpus" -ge 1 ] || { echo "--gpus-per-node >= 0 and --cpus-per-node >= 1" >&2; exit 2; }
  for tool in ip nsenter unshare mknod; do
    command -v "$tool" >/dev/null || { echo "$tool not found (iproute2/util-linux): bash scripts/setup.sh" >&2; exit 1; }
  done
  printf 'NODES=%s\nGPUS=%s\nCPUS=%s\nNET_ID=%s\n' "$nodes" "$gpus" "$cpus" "$net_id" > "$state"
  rm -rf "$dir/state" "$dir/spool" "$dir/nodes"
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run" "$dir/nodes" "$dir/nodetmp" "$dir/dev"
  ctl=$(hostname -s)
  { echo "127.0.0.1 localhost"; echo "$subnet.1 $ctl"
    for k in $(seq "$nodes"); do echo "$subnet.$((10 + k)) node$k"; done; } > "$dir/hosts"
  echo "nameserver 127.0.0.1" > "$dir/resolv.conf"  # nodes have no default route: no lookup leaves
  write_common_conf "$ctl($subnet.1)" "$ctl_port" 16828
  gres=""
  if [ "$gpus" -gt 0 ]; then
    for i in $(seq 0 $((gpus - 1))); do [ -e "$dir/dev/nvidia$i" ] || mknod "$dir/dev/nvidia$i" c 1 3; done
    files="$dir/dev/nvidia0"; [ "$gpus" -gt 1 ] && files="$dir/dev/nvidia[0-$((gpus - 1))]"
    echo "Name=gpu File=$files" > "$dir/gres.conf"
    gres=" Gres=gpu:$gpus"
  else
    : > "$dir/gres.conf"
  fi
  # SlurmdTimeout: a node that stops answering (link down, lost) is DOWN after ~30 s, not the default
  # 300 s, and its jobs are requeued (NODE_FAIL with --requeue).
  cat >> "$conf" <<CONF
SlurmdTimeout=30
SlurmdParameters=config_overrides
GresTypes=gpu
TmpFS=$dir/nodetmp
SlurmdSpoolDir=$dir/spool/%n
SlurmdPidFile=$dir/run/slurmd.%n.pid
SlurmdLogFile=$dir/log/slurmd.%n.log
CONF
  for k in $(seq "$nodes"); do
    echo "NodeName=node$k NodeAddr=$subnet.$((10 + k)) NodeHostname=node$k CPUs=$cpus RealMemory=4000$gres State=UNKNOWN" >> "$conf"
  done
  cat >> "$conf" <<CONF
PartitionName=low Nodes=node[1-$nodes] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=15
PartitionName=high Nodes=node[1-$nodes] MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
  ip link add "$bridge" type bridge
  ip addr add "$subnet.1/24" dev "$bridge"
  ip link set "$bridge" up
  for k in $(seq "$nodes"); do node_net "$k"; done
  slurmctld -f "$conf"
  # All slurmds at once (each waits for its daemon to detach); any that fails fails the start.
  local pids=()
  for k in $(seq "$nodes"); do node_slurmd "$k" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
  wait_idle "$nodes"
}

case "$cmd" in
start)
  command -v slurmctld >/dev/null || { echo "slurmctld not found: apt-get install slurm-wlm" >&2; exit 1; }
  nodes=""; gpus=0; cpus=$(nproc)
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) nodes=$2; shift 2 ;;
      --gpus-per-node) gpus=$2; nodes=${nodes:-1}; shift 2 ;;
      --cpus-per-node) cpus=$2; nodes=${nodes:-1}; shift 2 ;;
      *) echo "unknown option $1" >&2; exit 2 ;;
    esac
  done
  if [ -n "$nodes" ] && foreign; then
    echo "network $subnet.0/24 ($bridge) is in use by another test cluster; use another DIR" >&2; exit 1
  fi
  stop_single; stop_multi  # start over whatever an earlier start left
  mkdir -p "$dir"
  if [ -z "$nodes" ]; then
    start_single
  else
    # A failed start leaves nothing behind.  (A trap, not `start_multi || stop_multi`: bash ignores
    # set -e inside a function called as a condition, so a failing step would not stop the start.)
    trap 'rc=$?; if [ "$rc" -ne 0 ]; then echo "start failed; cleaning up md$net_id-*, $bridge" >&2; stop_multi; fi; exit "$rc"' EXIT
    start_multi "$nodes" "$gpus" "$cpus"
    trap - EXIT
  fi
  ;;
stop) stop_single; stop_multi ;;
env) echo "export SLURM_CONF=$conf" ;;
node)
  k=${1:?node number}; action=${2:?kill|start|link-down|link-up|exec}; shift 2
  ns=$(ns_of "$k")
  case "$action" in
    kill) pids=$(ip netns pids "$ns"); [ -z "$pids" ] || kill -9 $pids ;;
    start) node_net "$k"; node_slurmd "$k" ;;
    link-down) ip link set "$(veth_of "$k")" down ;;
    link-up) ip link set "$(veth_of "$k")" up ;;
    exec) exec nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private bash -c \
      "hostname node$k; mount --bind '$dir/hosts' /etc/hosts; exec \"\$@\"" node "$@" ;;
    *) echo "unknown node action $action" >&2; exit 2 ;;
  esac
  ;;
*) echo "usage: $0 start DIR [--nodes N] [--gpus-per-node G] [--cpus-per-node C] | stop DIR | env DIR | node DIR K ACTION" >&2; exit 2 ;;
esac
