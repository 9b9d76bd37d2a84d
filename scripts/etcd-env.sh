#!/usr/bin/env bash
# Starts a throwaway etcd on loopback (free non-default ports, temporary data
# directory), waits until it is healthy, and prints the endpoint.
#
#   source scripts/etcd-env.sh   # exports SESSION_LIFECYCLE_ETCD and ETCD_PID
#
# The server stops when the shell that sourced this exits (trap on EXIT).
# Needs the `etcd` binary (Debian: apt-get install etcd-server).

# A port nothing listens on (a connection to it is refused).
etcd_port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
# SESSION_LIFECYCLE_ETCD_PORT, or the first free pair from 23790 on.
etcd_port="${SESSION_LIFECYCLE_ETCD_PORT:-}"
if [ -z "$etcd_port" ]; then
  etcd_port=23790
  while ! { etcd_port_free "$etcd_port" && etcd_port_free $((etcd_port + 1)); }; do
    etcd_port=$((etcd_port + 2))
  done
fi
etcd_peer_port=$((etcd_port + 1))
etcd_dir="$(mktemp -d -t session-lifecycle-etcd.XXXXXX)"
etcd \
  --name session-lifecycle-test \
  --data-dir "$etcd_dir" \
  --listen-client-urls "http://127.0.0.1:${etcd_port}" \
  --advertise-client-urls "http://127.0.0.1:${etcd_port}" \
  --listen-peer-urls "http://127.0.0.1:${etcd_peer_port}" \
  --initial-advertise-peer-urls "http://127.0.0.1:${etcd_peer_port}" \
  --initial-cluster "session-lifecycle-test=http://127.0.0.1:${etcd_peer_port}" \
  --log-level error >"$etcd_dir.log" 2>&1 &
ETCD_PID=$!
export ETCD_PID
# `|| true`: under `set -e` a stopped server's exit status must not become
# the shell's.
# An etcd that exited before the shell did is reported with its log.
etcd_stop() {
  if ! kill -0 "$ETCD_PID" 2>/dev/null; then
    echo "etcd (pid $ETCD_PID) had exited; its log:" >&2
    tail -n 50 "$etcd_dir.log" >&2 || true
    df -h "$etcd_dir" >&2 || true
  fi
  kill "$ETCD_PID" 2>/dev/null || true
  wait "$ETCD_PID" 2>/dev/null || true
  rm -rf "$etcd_dir" "$etcd_dir.log"
}
trap etcd_stop EXIT

healthy=0
for _ in $(seq 1 100); do
  if ETCDCTL_API=3 etcdctl --endpoints "http://127.0.0.1:${etcd_port}" endpoint health >/dev/null 2>&1; then
    healthy=1
    break
  fi
  if ! kill -0 "$ETCD_PID" 2>/dev/null; then
    break
  fi
  sleep 0.1
done
if [ "$healthy" = 1 ] && { sleep 0.5; ! kill -0 "$ETCD_PID" 2>/dev/null; }; then
  # Something else answered on the port: not our etcd.
  echo "port ${etcd_port} is taken by another server; set SESSION_LIFECYCLE_ETCD_PORT" >&2
  healthy=0
fi
if [ "$healthy" != 1 ]; then
  echo "etcd did not become healthy on port ${etcd_port}; its log:" >&2
  cat "$etcd_dir.log" >&2
  exit 1
fi
export SESSION_LIFECYCLE_ETCD="http://127.0.0.1:${etcd_port}"
echo "etcd is up at $SESSION_LIFECYCLE_ETCD (pid $ETCD_PID, data in $etcd_dir)"
