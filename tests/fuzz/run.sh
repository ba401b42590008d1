#!/usr/bin/env bash
# Coverage-guided fuzzing of job parsing and image preparation, each for a
# bounded time (default 60 s per target): bash tests/fuzz/run.sh [SECONDS]
# Installs cargo-fuzz when missing. cargo-fuzz needs nightly-only compiler
# flags; on a stable toolchain RUSTC_BOOTSTRAP=1 allows them. A crash is
# saved under tests/fuzz/artifacts/<target>/ and becomes a regression test.
set -euo pipefail
cd "$(dirname "$0")"
. ../debian-tools.sh
ensure_debian_tools "${build_tools[@]}"
secs=${1:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in job_parse prepare; do
  mkdir -p "corpus/$target"
  cargo fuzz run --fuzz-dir . --sanitizer none "$target" "corpus/$target" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=262144
done
