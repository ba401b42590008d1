# Sourced by tests/run.sh, the benchmarks and the fuzz script: installs the
# Debian packages they need when missing, and fails (never skips) when it
# cannot. Each argument is `command:why`; the package has the command's name.
#
#   nasm: the SIMD code of libjpeg (mozjpeg-sys builds it from source with
#         the `cc` crate and links it statically). A build without nasm
#         works but prepares JPEGs several times slower, and says so; the
#         tests, benchmarks and fuzzing build with it. No cmake is needed.
#   prometheus, promtool: both come with the `prometheus` package.
ensure_debian_tools() {
  local missing=() spec cmd
  for spec in "$@"; do
    cmd=${spec%%:*}
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  # promtool ships in the prometheus package.
  missing=("${missing[@]/#promtool/prometheus}")
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

# Enable RabbitMQ's rabbitmq_prometheus plugin when its endpoint does not
# answer, listening on 127.0.0.1:15692 only (the plugin's default is every
# interface). Needs rabbitmqctl rights on the local node (root); fails,
# never skips, when it cannot.
ensure_rabbitmq_prometheus() {
  local probe=(curl -fsS -o /dev/null --max-time 5 http://127.0.0.1:15692/metrics/per-object)
  command -v curl >/dev/null 2>&1 || probe=(bash -c '(exec 3<>/dev/tcp/127.0.0.1/15692)')
  "${probe[@]}" 2>/dev/null && return 0
  echo "enabling RabbitMQ's rabbitmq_prometheus plugin on 127.0.0.1:15692…"
  rabbitmqctl eval 'application:set_env(rabbitmq_prometheus, tcp_config, [{port, 15692}, {ip, "127.0.0.1"}], [{persistent, true}]).' >/dev/null \
    && rabbitmq-plugins enable rabbitmq_prometheus >/dev/null \
    || { echo "error: could not enable rabbitmq_prometheus (tests/prometheus.rs needs it): run 'rabbitmq-plugins enable rabbitmq_prometheus' as root." >&2; return 1; }
  for _ in $(seq 1 30); do "${probe[@]}" 2>/dev/null && return 0; sleep 1; done
  echo "error: rabbitmq_prometheus enabled but 127.0.0.1:15692 does not answer." >&2
  return 1
}
