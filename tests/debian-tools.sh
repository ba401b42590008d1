# Sourced by tests/run.sh, the benchmarks and the fuzz script: installs the
# Debian packages they need when missing, and fails (never skips) when it
# cannot. Each argument is `command:why`; the package has the command's name.
#
#   nasm: the SIMD code of libjpeg (mozjpeg-sys builds it from source with
#         the `cc` crate and links it statically). A build without nasm
#         works but prepares JPEGs several times slower, and says so; the
#         tests, benchmarks and fuzzing build with it. No cmake is needed.
ensure_debian_tools() {
  local missing=() spec cmd
  for spec in "$@"; do
    cmd=${spec%%:*}
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}…"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q "${missing[@]}" >/dev/null \
      || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "${missing[@]}" >/dev/null; } \
      || true
  fi
  for spec in "$@"; do
    cmd=${spec%%:*}
    if ! command -v "$cmd" >/dev/null 2>&1; then
      echo "error: $cmd is required (${spec#*:}) and could not be installed ('apt-get install $cmd')." >&2
      return 1
    fi
  done
}

# What a full-speed build of the crate needs.
build_tools=("nasm:libjpeg's SIMD code")
