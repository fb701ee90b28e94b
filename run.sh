#!/usr/bin/env bash
# One entry point for people and CI:
#   ./run.sh demo           local broker + service + sample catalog + a few searches
#   ./run.sh test           the whole test suite (what CI runs)
#   ./run.sh lint           ruff (format and lint) and mypy (what CI runs before the tests)
#   ./run.sh bench [--quick] the speed and memory benchmark
# Each command first creates .venv and installs the pinned dependencies (once).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
    touch "$stamp"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo)
    setup
    exec "$VENV/bin/python" -m producer_examples.demo "$@"
    ;;
  test)
    setup
    # Prometheus + promtool (Debian) for tests/deploy/test_prometheus.py; stop the daemon its postinst may start on :9090.
    command -v prometheus >/dev/null || (
      sudo=$([ "$(id -u)" = 0 ] || echo sudo)
      $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
      $sudo service prometheus stop >/dev/null 2>&1 || true
    )
    # stunnel4 (Debian) puts TLS in front of the local Kafka and MongoDB for tests/config/test_tls.py and tests/config/test_secrets.py.
    command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || (
      sudo=$([ "$(id -u)" = 0 ] || echo sudo)
      $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends stunnel4 >/dev/null
    ) || echo "run.sh: could not install stunnel4: the TLS tests skip (and fail under CI)" >&2
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  lint)
    setup
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/ruff" check .
    exec "$VENV/bin/mypy"
    ;;
  bench)
    setup
    exec "$VENV/bin/python" -m benchmarks.run "$@"
    ;;
  *)
    echo "usage: ./run.sh demo | test | lint | bench [--quick]" >&2
    exit 2
    ;;
esac
