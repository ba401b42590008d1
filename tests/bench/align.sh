#!/usr/bin/env bash
# The aligned-mask benchmark (not part of the test run): what storing each
# segment mask on the source's pixel grid costs a 12 MP phone photo's job,
# beside that job's own preparation, in ms and peak RSS, single core.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/debian-tools.sh
ensure_debian_tools "${build_tools[@]}"

bin=$(cargo bench --locked --bench align --no-run --message-format=json \
  | python3 -c 'import json, sys
exes = [m["executable"] for m in map(json.loads, sys.stdin)
        if m.get("reason") == "compiler-artifact" and m.get("executable")
        and m["target"]["name"] == "align"]
print(exes[-1])')
exec taskset -c 0 "$bin" --bench "$@"
