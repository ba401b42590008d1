#!/usr/bin/env bash
# The test command (README "Run the tests", and CI via .ci/run).
#
# Brings up what the tests need that `cargo test` cannot start itself, then
# runs every test. The S3 server (s3s-fs) and the Kling simulator start
# inside the tests; RabbitMQ is the one external service. A missing service
# is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

amqp_host=127.0.0.1
amqp_port=5672

broker_up() { (exec 3<>"/dev/tcp/$amqp_host/$amqp_port") 2>/dev/null; }

if ! broker_up; then
  echo "RabbitMQ is not answering on $amqp_host:$amqp_port; trying to start it…"
  if command -v rabbitmq-server >/dev/null 2>&1; then
    rabbitmq-server -detached || true
    for _ in $(seq 1 60); do broker_up && break; sleep 1; done
  fi
fi
if ! broker_up; then
  echo "error: RabbitMQ is required at $amqp_host:$amqp_port (guest/guest) and is not running." >&2
  echo "       Install and start it, e.g. 'apt-get install rabbitmq-server && rabbitmq-server -detached'." >&2
  exit 1
fi

# A test that panics skips its async cleanup; sweep queues such runs left
# (test queues are named t.kling.*; nothing is running yet).
if command -v rabbitmqctl >/dev/null 2>&1; then
  rabbitmqctl list_queues -q name 2>/dev/null | awk '$1 ~ /^t\.kling\./ {print $1}' \
    | while read -r q; do rabbitmqctl delete_queue "$q" </dev/null >/dev/null 2>&1 || true; done
fi

# Debian packages the build and the tests need, installed when missing:
# nasm (libjpeg's SIMD code), Chromium (the report tests render pages in a
# headless browser), prometheus and promtool (tests/prometheus.rs runs the
# alert rules and the dashboard's queries through them).
. tests/debian-tools.sh
ensure_debian_tools "${build_tools[@]}" "chromium:the report tests (headless browser)" \
  "prometheus:tests/prometheus.rs (a real Prometheus)" "promtool:tests/prometheus.rs (rule tests)"

# RabbitMQ's own exporter (the dashboard's queue depth and two alerts read
# its series), on loopback only: tests/prometheus.rs scrapes it.
ensure_rabbitmq_prometheus

# Warm the broker: `rabbitmq-server -detached` returns before AMQP accepts
# logins; the tests' own connections then fail fast with a clear message.
cargo test --all-targets --locked "$@"

# The newcomer's path: the worker built with no cmake and no nasm on PATH
# (its own target directory, cold the first time: a few minutes), and the
# demo run from that build.
bash tests/bare-build.sh
