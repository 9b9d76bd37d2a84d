#!/usr/bin/env bash
# Runs the EtcdStore test suite against a real etcd on loopback.
#
#   scripts/test-etcd.sh            # installs etcd and protoc if missing (as root)
#   scripts/test-etcd.sh -- --nocapture
#
# Starts etcd in a temporary directory on free non-default ports, waits for
# it, runs every etcd test suite (the same list as .ci/run: etcd_store,
# etcd_faults, adversarial_etcd, etcd_late_incarnations, etcd_watch_user_code,
# etcd_resume_closing, the adversarial_etcd_user_code_* suites and the etcd
# unit tests) with the endpoint in
# SESSION_LIFECYCLE_ETCD, and stops etcd.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing: ${need[*]} (Debian packages); install them or run as root" >&2
    exit 1
  fi
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
fi

# shellcheck source=scripts/etcd-env.sh
. scripts/etcd-env.sh
args=()
if [ "${1:-}" = "--" ]; then
  shift
  args=(-- "$@")
fi
SESSION_LIFECYCLE_ETCD_REQUIRED=1 cargo test --features etcd,test-util --lib \
  --test etcd_store --test etcd_faults --test adversarial_etcd \
  --test etcd_late_incarnations --test etcd_watch_user_code --test etcd_resume_closing \
  --test adversarial_etcd_user_code_decode_panic --test adversarial_etcd_user_code_decoded_drops \
  --test adversarial_etcd_user_code_store_drop --test adversarial_etcd_user_code_create "${args[@]}"
