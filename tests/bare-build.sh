#!/usr/bin/env bash
# The newcomer's path, run by tests/run.sh (and so by CI): build the worker
# on a machine with only the Rust toolchain and a C compiler, then run the
# README's demo from that build.
#
# "Only the toolchain": PATH is every command of this machine's PATH except
# cmake and nasm, with a failing `cmake` stub first, so any attempt to run
# cmake fails the build loudly. nasm is left out rather than stubbed:
# mozjpeg-sys takes any `nasm` it can start for a working one (it runs
# `nasm -v` and ignores the exit status), so a failing stub named nasm fails
# its build ("NASM build failed: Unable to run nasm"); a machine without
# nasm is modelled by its absence.
#
# The build goes to its own target directory (default target/bare, or
# $BARE_TARGET_DIR), cold the first time: build scripts do not rerun when
# PATH changes, so sharing the main target directory would prove nothing.
# It must print the SIMD-off warning, and the demo must archive its six
# samples and print the SIMD-off line at start-up.
#
#   bash tests/bare-build.sh [--release]
set -euo pipefail
cd "$(dirname "$0")/.."

profile=debug
cargo_flags=()
if [ "${1:-}" = "--release" ]; then
  profile=release
  cargo_flags+=(--release)
fi
target=${BARE_TARGET_DIR:-$PWD/target/bare}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/stubs" "$work/bin"
for tool in cmake; do
  printf '#!/bin/sh\necho "%s: not installed (stub: this build must not need it)" >&2\nexit 127\n' \
    "$tool" >"$work/stubs/$tool"
  chmod +x "$work/stubs/$tool"
done
IFS=: read -r -a dirs <<<"$PATH"
for d in "${dirs[@]}"; do
  [ -d "$d" ] || continue
  for f in "$d"/*; do
    name=${f##*/}
    case $name in cmake | nasm | ndisasm) continue ;; esac
    [ -x "$f" ] && [ ! -e "$work/bin/$name" ] && ln -s "$f" "$work/bin/$name"
  done
done
bare_path="$work/stubs:$work/bin"

if PATH=$bare_path command -v nasm >/dev/null; then
  echo "error: nasm is still on the bare PATH" >&2
  exit 1
fi
if PATH=$bare_path cmake --version >/dev/null 2>&1; then
  echo "error: the cmake stub does not fail" >&2
  exit 1
fi

echo "bare build: cmake fails, nasm absent; $profile build into $target…"
started=$(date +%s)
status=0
PATH=$bare_path cargo build --locked "${cargo_flags[@]}" --bin worker --target-dir "$target" \
  >"$work/build.log" 2>&1 || status=$?
grep -E '^(warning: kling-archiver|error)|Finished' "$work/build.log" || true
if [ "$status" -ne 0 ]; then
  tail -40 "$work/build.log" >&2
  echo "error: the build without cmake and nasm failed" >&2
  exit 1
fi
echo "bare build took $(($(date +%s) - started)) s"
if ! grep -q 'JPEG SIMD is OFF' "$work/build.log"; then
  echo "error: a build without nasm did not warn that JPEG SIMD is off" >&2
  exit 1
fi

archive="$work/archive"
if ! PATH=$bare_path "$target/$profile/worker" demo --archive "$archive" --latency-ms 0 \
  >"$work/demo.out" 2>"$work/demo.err"; then
  cat "$work/demo.out" "$work/demo.err" >&2
  echo "error: the demo from the bare build failed" >&2
  exit 1
fi
manifests=$(find "$archive/jobs" -name manifest.json | wc -l)
if [ "$manifests" -ne 6 ]; then
  cat "$work/demo.out" "$work/demo.err" >&2
  echo "error: the demo archived $manifests jobs, expected 6" >&2
  exit 1
fi
if ! grep -q 'JPEG SIMD is off' "$work/demo.err"; then
  cat "$work/demo.err" >&2
  echo "error: the demo from a build without nasm did not say SIMD is off" >&2
  exit 1
fi
echo "bare build: ok (demo archived $manifests jobs; it said: $(grep -o 'JPEG SIMD is off[^:]*' "$work/demo.err" | head -1))"
