#!/usr/bin/env bash
# The preparation benchmark (not part of the test run): `prepare` against
# libvips on the same inputs, single-threaded, in one run. Installs what the
# libvips side needs when missing (Debian's libvips42, pyvips from PyPI),
# then prints the table and writes it to target/bench-prepare.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

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

# Single core for both sides: libvips via VIPS_CONCURRENCY=1 (set by the
# bench), ours is single-threaded by construction; taskset pins both.
cargo bench --locked --bench prepare --no-run
exec taskset -c 0 cargo bench --locked --bench prepare "$@"
