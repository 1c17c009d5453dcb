#!/usr/bin/env bash
# Starts the agent, then the kernel, on the example configs in config/, with sockets and logs
# under ./run so that it works without root, and with the demo keys. Ctrl-C stops both.
#
# The processes read copies of config/agent-config.yaml and config/kernel-config.yaml under
# ./run, with the paths of the container (/var/run/policy-engine, /var/log/policy-engine,
# /etc/policy-engine/keys) pointed into ./run and config/demo. Edit the files in config/: within
# a second the copies are made again and both processes reload them (as on SIGHUP).
#
# Environment (defaults in brackets):
#   EXTPROC_ADDR        ext_proc listen address, host:port or unix:///path [127.0.0.1:9001]
#   METRICS_ADDR        the kernel's metrics and health probes [:9090]
#   AGENT_METRICS_ADDR  the agent's metrics and health probes [127.0.0.1:9091]
#   ADMIN_ADDR          the kernel's admin listener: /config, /debug/explain, pprof [127.0.0.1:9190]
#   AGENT_ADMIN_ADDR    the agent's admin listener: /config, pprof [127.0.0.1:9191]
#   RUN_DIR             sockets, logs and the config copies [./run]
#   CONFIG_DIR          where the configs to edit are [./config]
#   BIN_DIR             where policy-kernel and policy-agent are [./bin]
# It exits 0 when stopped by Ctrl-C or SIGTERM, and non-zero, after the failing process's own
# error, when either process fails to start or stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR="${RUN_DIR:-$PWD/run}"
CONFIG_DIR="${CONFIG_DIR:-$PWD/config}"
BIN_DIR="${BIN_DIR:-$PWD/bin}"
EXTPROC_ADDR="${EXTPROC_ADDR:-127.0.0.1:9001}"
METRICS_ADDR="${METRICS_ADDR:-:9090}"
AGENT_METRICS_ADDR="${AGENT_METRICS_ADDR:-127.0.0.1:9091}"
# The admin listeners: /config, /debug/pprof/ and the kernel's /debug/explain, on loopback.
ADMIN_ADDR="${ADMIN_ADDR:-127.0.0.1:9190}"
AGENT_ADMIN_ADDR="${AGENT_ADMIN_ADDR:-127.0.0.1:9191}"
mkdir -p "$RUN_DIR/agents" "$RUN_DIR/log"
# The example agent config takes its keys from outside; this supplies the demo ones, which are
# public (anyone can present the API key and mint tokens with the private key of config/demo):
# the API key "demo-key-123", and the demo public key for JWTs (go run ./scripts/demotoken).
export POLICY_ENGINE_API_KEY_SHA256="${POLICY_ENGINE_API_KEY_SHA256:-a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873}"
JWT_PUBLIC_KEY="${JWT_PUBLIC_KEY:-$PWD/config/demo/jwt-demo-public.pem}"

# copy writes the run/ copy of one config (through a temporary file and a rename, so that a
# process never reads half a file), and only when its content changes.
copy() {
  local name=$1 tmp
  tmp=$(mktemp "$RUN_DIR/.$name.XXXXXX")
  sed "s#/var/run/policy-engine#$RUN_DIR#g; s#/var/log/policy-engine#$RUN_DIR/log#g; s#/etc/policy-engine/keys/jwt-public.pem#$JWT_PUBLIC_KEY#g; s#metrics_address: \"127.0.0.1:9091\"#metrics_address: \"$AGENT_METRICS_ADDR\"#; s#admin_address: \"127.0.0.1:9191\"#admin_address: \"$AGENT_ADMIN_ADDR\"#" \
    "$CONFIG_DIR/$name" >"$tmp"
  chmod 600 "$tmp"
  if cmp -s "$tmp" "$RUN_DIR/$name"; then
    rm -f "$tmp"
  else
    mv -f "$tmp" "$RUN_DIR/$name"
  fi
}
copy agent-config.yaml
copy kernel-config.yaml

echo "policy-engine: edit $CONFIG_DIR/kernel-config.yaml and $CONFIG_DIR/agent-config.yaml; the processes run on copies in $RUN_DIR, made again within a second of an edit, and reload them" >&2
echo "policy-engine: ext_proc on $EXTPROC_ADDR, kernel metrics on $METRICS_ADDR (admin $ADMIN_ADDR), agent metrics on $AGENT_METRICS_ADDR (admin $AGENT_ADMIN_ADDR); logs in $RUN_DIR/log (Ctrl-C stops)" >&2

"$BIN_DIR/policy-agent" --config "$RUN_DIR/agent-config.yaml" 2> >(tee "$RUN_DIR/log/agent.log" >&2) &
agent=$!
"$BIN_DIR/policy-kernel" --config "$RUN_DIR/kernel-config.yaml" --listen "$EXTPROC_ADDR" --metrics-listen "$METRICS_ADDR" --admin-listen "$ADMIN_ADDR" \
  2> >(tee "$RUN_DIR/log/kernel.log" >&2) &
kernel=$!
# Follows the edits of config/ (a failed copy, e.g. of a file being saved, is tried again).
(
  while sleep 1; do
    copy agent-config.yaml 2>/dev/null || true
    copy kernel-config.yaml 2>/dev/null || true
  done
) &
syncer=$!

stop() {
  kill -TERM "$syncer" 2>/dev/null || true
  kill -TERM "$kernel" 2>/dev/null || true
  wait "$kernel" 2>/dev/null || true
  kill -TERM "$agent" 2>/dev/null || true
  wait "$agent" 2>/dev/null || true
  wait "$syncer" 2>/dev/null || true
}
stopping=0
trap 'stopping=1' INT TERM
set +e
wait -n -p ended "$agent" "$kernel"
status=$?
stop
if [ "$stopping" = 1 ]; then
  exit 0
fi
name=policy-agent
[ "${ended:-}" = "$kernel" ] && name=policy-kernel
echo "policy-engine: $name stopped with exit status $status (its error is above); stopped the other one" >&2
[ "$status" -ne 0 ] || status=1
exit "$status"
