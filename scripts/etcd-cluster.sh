#!/usr/bin/env bash
# Starts a throwaway 3-member etcd cluster on loopback (free ports found at
# run time, temporary data directories), waits until every member is
# healthy and the cluster has a leader, and exports the endpoints.
#
#   source scripts/etcd-cluster.sh   # exports SESSION_LIFECYCLE_ETCD (3 endpoints,
#                                    # comma-separated) and ETCD_CLUSTER_PIDS
#
# The members stop when the shell that sourced this exits (trap on EXIT).
# SESSION_LIFECYCLE_ETCD_CLUSTER_PORT (default 23900) is where the search for
# free ports starts. Needs `etcd` and `etcdctl` (Debian: etcd-server,
# etcd-client).

cluster_dir="$(mktemp -d -t session-lifecycle-etcd-cluster.XXXXXX)"

# A port nothing listens on (a connection to it is refused).
etcd_cluster_port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

etcd_cluster_ports=()
candidate="${SESSION_LIFECYCLE_ETCD_CLUSTER_PORT:-23900}"
while [ "${#etcd_cluster_ports[@]}" -lt 6 ] && [ "$candidate" -lt 65000 ]; do
  if etcd_cluster_port_free "$candidate"; then
    etcd_cluster_ports+=("$candidate")
  fi
  candidate=$((candidate + 1))
done
if [ "${#etcd_cluster_ports[@]}" -lt 6 ]; then
  echo "no 6 free loopback ports for the etcd cluster" >&2
  exit 1
fi

initial=""
for i in 0 1 2; do
  initial="${initial:+$initial,}m$i=http://127.0.0.1:${etcd_cluster_ports[$((2 * i + 1))]}"
done
ETCD_CLUSTER_PIDS=""
endpoints=""
for i in 0 1 2; do
  client="http://127.0.0.1:${etcd_cluster_ports[$((2 * i))]}"
  peer="http://127.0.0.1:${etcd_cluster_ports[$((2 * i + 1))]}"
  etcd \
    --name "m$i" \
    --data-dir "$cluster_dir/m$i" \
    --listen-client-urls "$client" \
    --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" \
    --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$initial" \
    --initial-cluster-token "session-lifecycle-$$" \
    --log-level error >"$cluster_dir/m$i.log" 2>&1 &
  ETCD_CLUSTER_PIDS="${ETCD_CLUSTER_PIDS:+$ETCD_CLUSTER_PIDS }$!"
  endpoints="${endpoints:+$endpoints,}$client"
done
export ETCD_CLUSTER_PIDS
# `|| true`: under `set -e` a stopped server's exit status must not become
# the shell's.
# A member that exited before the shell did is reported with its log (and
# the free space where its data was): a member lost under the tests is
# never silent.
etcd_cluster_stop() {
  local i=0
  for p in $ETCD_CLUSTER_PIDS; do
    if ! kill -0 "$p" 2>/dev/null; then
      echo "etcd member m$i (pid $p) had exited; its log:" >&2
      tail -n 50 "$cluster_dir/m$i.log" >&2 || true
      df -h "$cluster_dir" >&2 || true
    fi
    i=$((i + 1))
  done
  # shellcheck disable=SC2086
  kill $ETCD_CLUSTER_PIDS 2>/dev/null || true
  for p in $ETCD_CLUSTER_PIDS; do wait "$p" 2>/dev/null || true; done
  rm -rf "$cluster_dir"
}
trap etcd_cluster_stop EXIT

healthy=0
for _ in $(seq 1 200); do
  if ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint health >/dev/null 2>&1; then
    healthy=1
    break
  fi
  for p in $ETCD_CLUSTER_PIDS; do
    kill -0 "$p" 2>/dev/null || break 2
  done
  sleep 0.1
done
for p in $ETCD_CLUSTER_PIDS; do
  if ! kill -0 "$p" 2>/dev/null; then
    # A port was taken between the check and the start: not our etcd.
    healthy=0
  fi
done
if [ "$healthy" != 1 ]; then
  echo "the etcd cluster did not become healthy at $endpoints; its logs:" >&2
  cat "$cluster_dir"/m*.log >&2
  exit 1
fi
export SESSION_LIFECYCLE_ETCD="$endpoints"
echo "etcd cluster is up at $SESSION_LIFECYCLE_ETCD (pids $ETCD_CLUSTER_PIDS, data in $cluster_dir)"
