#!/bin/sh
# ainode set-up on Debian 12: `./setup.sh run` installs and runs the node on embedded
# defaults; `./setup.sh test` installs everything the tests need and runs the whole suite.
# Debian packages are installed only when running as root (apt-get).
set -eu
cd "$(dirname "$0")"

apt_install() {
    missing=""
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
    done
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "setup.sh: missing Debian packages:$missing (run as root to install them)" >&2
        exit 1
    fi
    echo "setup.sh: installing$missing" >&2
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
}

venv() {
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
        .venv/bin/python -m pip install -q --upgrade pip
    fi
    .venv/bin/python -m pip install -q -c constraints.txt -e "$1"
}

case "${1:-}" in
run)
    shift
    apt_install python3-venv
    venv .
    # `--demo` is an option of `serve`; the others are the node's global options
    demo=""
    for arg do
        shift
        if [ "$arg" = --demo ]; then demo=--demo; else set -- "$@" "$arg"; fi
    done
    exec .venv/bin/ainode "$@" serve $demo
    ;;
test)
    shift
    apt_install python3-venv dcmtk orthanc orthanc-dicomweb postgresql redis-server chromium
    venv ".[test,lite]"
    .venv/bin/ruff format --check .
    .venv/bin/ruff check .
    .venv/bin/lint-imports --no-cache
    export TCP_NODELAY=1 TF_CPP_MIN_LOG_LEVEL=2
    exec .venv/bin/python -m pytest "$@"
    ;;
*)
    echo "usage: ./setup.sh run [--demo] [ainode options] | ./setup.sh test [pytest options]" >&2
    exit 2
    ;;
esac
