#!/usr/bin/env bash
# Build Sluice on this machine, idempotently:
#   ./build.sh          create .venv, install the project, generate proto stubs, train the example models
#   ./build.sh test     the above, then run the whole test suite
#   ./build.sh images   build the container images used by docker-compose.yml (needs a Docker engine)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
PY=$VENV/bin/python

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

install_project() {
  if [ ! -x "$PY" ]; then
    step "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
  fi
  # Re-install only when pyproject.toml changed since the last successful install.
  local stamp=$VENV/.sluice-installed want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    step "installing sluice and its dependencies"
    "$PY" -m pip install -q -e '.[dev]'
    echo "$want" >"$stamp"
  fi
}

generate_protos() {
  step "generating proto stubs"
  mkdir -p sluice/v1
  "$PY" -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. proto/sluice/v1/*.proto
  : >sluice/v1/__init__.py
}

fetch_zipkin() {
  # The real Zipkin server for tracing (sluice up, tests): the exec jar from Maven Central.
  local version jar=.sluice/zipkin/zipkin-server-exec.jar
  version=$("$PY" -c 'from sluice.local.zipkin import VERSION; print(VERSION)')
  if [ -f "$jar" ] && [ "$(cat .sluice/zipkin/VERSION 2>/dev/null)" = "$version" ]; then return; fi
  if ! command -v mvn >/dev/null || ! command -v java >/dev/null; then
    echo "    (no java/mvn: tracing stays off; Zipkin is not fetched)"
    return
  fi
  step "fetching zipkin-server $version (Maven Central)"
  mkdir -p .sluice/zipkin
  mvn -q -B dependency:copy -Dartifact="io.zipkin:zipkin-server:$version:jar:exec" \
    -DoutputDirectory=.sluice/zipkin -Dmdep.stripVersion=true
  echo "$version" >.sluice/zipkin/VERSION
}

ensure_chromium() {
  # The console's browser tests (tests/e2e/test_console.py) drive Debian's chromium with
  # Playwright (no browser download): install the package when it is missing.
  [ -x /usr/bin/chromium ] && return
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null; then
    step "installing chromium (Debian package) for the console's browser tests"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium || true
  fi
  [ -x /usr/bin/chromium ] || echo "    (no /usr/bin/chromium: tests/e2e/test_console.py will fail until 'apt-get install chromium')"
}

train_models() {
  step "training the example models (deterministic)"
  "$PY" -m models.build
}

install_project
generate_protos
fetch_zipkin
train_models

case "${1:-}" in
  "") ;;
  test)
    shift
    ensure_chromium
    step "running the tests"
    exec "$PY" -m pytest "$@"
    ;;
  images)
    step "building container images"
    exec docker compose build
    ;;
  *)
    echo "usage: ./build.sh [test [pytest args...] | images]" >&2
    exit 2
    ;;
esac
