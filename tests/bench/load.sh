#!/usr/bin/env bash
# The load benchmark (not part of the test run): N jobs through the release
# worker binary against the simulator with 1 s latency, 300 ms per segment
# download and an S3 server answering 30 ms late, at concurrency 32 and
# 128, in-spec and out-of-spec, each with prefetch = C and with the default
# 2 x C; throughput against Little's law, Kling calls in flight, CPU per
# job, peak RSS. Needs RabbitMQ on 127.0.0.1:5672 (guest/guest). Extra
# flags go to the bench: --jobs-per-slot K --latency-ms L --concurrency 32,128
# --mix in,out --cdn-latency-ms 300 --s3-latency-ms 30 --prefetch 1,default
# (prefetch per case, in multiples of C or `default`)
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/debian-tools.sh
ensure_debian_tools "${build_tools[@]}"
(exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null || {
  echo "error: RabbitMQ is required on 127.0.0.1:5672 (rabbitmq-server -detached)" >&2
  exit 1
}
bin=$(cargo bench --locked --bench load --no-run --message-format=json \
  | python3 -c 'import json, sys
exes = [m["executable"] for m in map(json.loads, sys.stdin)
        if m.get("reason") == "compiler-artifact" and m.get("executable")
        and m["target"]["name"] == "load"]
print(exes[-1])')
exec "$bin" --bench "$@"
