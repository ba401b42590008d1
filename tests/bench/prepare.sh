#!/usr/bin/env bash
# The preparation benchmark (not part of the test run): `prepare` against
# libvips on the same inputs, single-threaded, in one run. Installs what the
# libvips side needs when missing (Debian's libvips42, pyvips from PyPI),
# then prints the table and writes it to target/bench-prepare.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/debian-tools.sh
ensure_debian_tools "${build_tools[@]}"

if ! python3 -c 'import pyvips' >/dev/null 2>&1; then
  echo "installing libvips (Debian) and pyvips (PyPI) for the benchmark…"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q libvips42 >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q libvips42 >/dev/null; }
  python3 -m pip install -q 'pyvips>=2.2,<4'
fi
python3 -c 'import pyvips; print("libvips", pyvips.version(0), pyvips.version(1), pyvips.version(2))'

# The production build: with SIMD, or no build at all.
export KLING_REQUIRE_JPEG_SIMD=1
# Build, then run the bench binary itself pinned to one core: libvips also
# gets VIPS_CONCURRENCY=1 (set by the bench); ours is single-threaded.
bin=$(cargo bench --locked --bench prepare --no-run --message-format=json \
  | python3 -c 'import json, sys
exes = [m["executable"] for m in map(json.loads, sys.stdin)
        if m.get("reason") == "compiler-artifact" and m.get("executable")
        and m["target"]["name"] == "prepare"]
print(exes[-1])')
taskset -c 0 "$bin" --bench "$@"
# The whole-machine figure (every core, ours against libvips), unpinned.
if [ $# -eq 0 ]; then "$bin" --bench machine; fi
