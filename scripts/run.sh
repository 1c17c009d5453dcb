#!/usr/bin/env bash
# Starts the agent, then the kernel, on the example configs with sockets and logs under ./run,
# so that it works without root, and with the demo keys. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR="${RUN_DIR:-$PWD/run}"
mkdir -p "$RUN_DIR/agents" "$RUN_DIR/log"
# The example agent config takes its keys from outside; this supplies the demo ones, which are
# public (anyone can present the API key and mint tokens with the private key of config/demo):
# the API key "demo-key-123", and the demo public key for JWTs (go run ./scripts/demotoken).
export POLICY_ENGINE_API_KEY_SHA256="${POLICY_ENGINE_API_KEY_SHA256:-a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873}"
JWT_PUBLIC_KEY="${JWT_PUBLIC_KEY:-$PWD/config/demo/jwt-demo-public.pem}"
sed "s#/var/run/policy-engine#$RUN_DIR#g; s#/var/log/policy-engine#$RUN_DIR/log#g; s#/etc/policy-engine/keys/jwt-public.pem#$JWT_PUBLIC_KEY#g" config/agent-config.yaml > "$RUN_DIR/agent-config.yaml"
sed "s#/var/run/policy-engine#$RUN_DIR#g; s#/var/log/policy-engine#$RUN_DIR/log#g" config/kernel-config.yaml > "$RUN_DIR/kernel-config.yaml"

./bin/policy-agent --config "$RUN_DIR/agent-config.yaml" 2> >(tee "$RUN_DIR/log/agent.log" >&2) &
agent=$!
./bin/policy-kernel --config "$RUN_DIR/kernel-config.yaml" 2> >(tee "$RUN_DIR/log/kernel.log" >&2) &
kernel=$!
stop() {
  kill -TERM "$kernel" 2>/dev/null || true
  wait "$kernel" 2>/dev/null || true
  kill -TERM "$agent" 2>/dev/null || true
  wait "$agent" 2>/dev/null || true
}
trap stop INT TERM
echo "policy-engine: ext_proc on 127.0.0.1:9001, kernel metrics on :9090, agent metrics on 127.0.0.1:9091 (Ctrl-C stops)" >&2
wait -n "$agent" "$kernel" || true
stop
