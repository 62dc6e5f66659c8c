#!/usr/bin/env bash
# Installs Autobahn|Testsuite 0.8.2 (`wstest`) into its own Python 2.7 virtualenv.
#
#   bash deploy/autobahn/install.sh        # prints the path of wstest on its last line
#
# Idempotent: a virtualenv built from the same requirements-py27.txt and the same interpreter
# is reused as it is (about a second). Steps, each timed:
#   1. a CPython 2.7: $AUTOBAHN_PYTHON2 if set, else pyenv's 2.7.x (the machine image has
#      2.7.18), else python2.7 on PATH, else `pyenv install 2.7.18` after the Debian build
#      dependencies (compiles from source: it needs python.org's tarball, or that tarball
#      already in $PYTHON_BUILD_CACHE_PATH)
#   2. virtualenv 16.7.12 (the last that creates Python 2 environments without extra
#      dependencies), installed with pip into $AUTOBAHN_HOME/bootstrap
#   3. $AUTOBAHN_HOME/venv from requirements-py27.txt (pinned, see README.md), then
#      `wstest -a` must say AutobahnTestSuite 0.8.2
#
# Environment: AUTOBAHN_HOME (default ${XDG_CACHE_HOME:-$HOME/.cache}/chat-gateway/autobahn),
# AUTOBAHN_PYTHON2 (a python2.7 to use). Runs as root (CI) or with sudo for apt-get.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
home="${AUTOBAHN_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/chat-gateway/autobahn}"
req="$here/requirements-py27.txt"
py27_version=2.7.18
virtualenv_version=16.7.12

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONWARNINGS=ignore

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
secs_since() { local d=$(( $(now_ms) - $1 )); printf '%d.%01d s' $((d / 1000)) $((d % 1000 / 100)); }
t_all=$(now_ms); t0=$t_all
start() { t0=$(now_ms); echo "autobahn-install: $*"; }
done_step() { echo "autobahn-install:   $1 took $(secs_since "$t0")"; }
wstest_version() { "$1" -a 2>/dev/null || true; }

is_py27() { [ -n "$1" ] && [ -x "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' 2>/dev/null; }

pyenv_bin() {
  if command -v pyenv >/dev/null 2>&1; then command -v pyenv
  elif [ -x "${PYENV_ROOT:-$HOME/.pyenv}/bin/pyenv" ]; then echo "${PYENV_ROOT:-$HOME/.pyenv}/bin/pyenv"
  fi
}

find_py27() {
  local c pyenv root
  if [ -n "${AUTOBAHN_PYTHON2:-}" ]; then is_py27 "$AUTOBAHN_PYTHON2" && { echo "$AUTOBAHN_PYTHON2"; return; }; return 1; fi
  pyenv="$(pyenv_bin)"
  if [ -n "$pyenv" ]; then
    root="$("$pyenv" root)"
    # the wanted patch release first, then any other 2.7.x pyenv has
    for c in "$root/versions/$py27_version/bin/python2.7" "$root"/versions/2.7.*/bin/python2.7; do
      is_py27 "$c" && { echo "$c"; return; }
    done
  fi
  for c in python2.7 python2; do
    c="$(command -v "$c" 2>/dev/null)" || continue
    # a pyenv shim answers even when it has no 2.7 to run: resolve it to the real binary
    c="$("$c" -c 'import sys; print(sys.executable)' 2>/dev/null)" || continue
    is_py27 "$c" && { echo "$c"; return; }
  done
  return 1
}

apt_install_missing() {
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "autobahn-install: apt-get install ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# 1. Python 2.7 ------------------------------------------------------------------------------
start "looking for CPython 2.7"
if ! py27="$(find_py27)"; then
  if [ -n "${AUTOBAHN_PYTHON2:-}" ]; then
    echo "autobahn-install: AUTOBAHN_PYTHON2=$AUTOBAHN_PYTHON2 is not a Python 2.7" >&2; exit 1
  fi
  pyenv="$(pyenv_bin)"
  if [ -z "$pyenv" ]; then
    echo "autobahn-install: no Python 2.7 and no pyenv to build one (Debian 12 has no python2.7 package);" >&2
    echo "autobahn-install: set AUTOBAHN_PYTHON2 to a python2.7 binary" >&2
    exit 1
  fi
  # What python-build needs to compile 2.7.18 with every module pip and wstest use
  # (ssl, zlib, bz2, ctypes via libffi, readline, sqlite3 for completeness).
  apt_install_missing build-essential make curl xz-utils libssl-dev zlib1g-dev libbz2-dev \
    libreadline-dev libsqlite3-dev libffi-dev liblzma-dev libncursesw5-dev
  echo "autobahn-install: pyenv install $py27_version (compiles from source)"
  if ! "$pyenv" install -s "$py27_version"; then
    echo "autobahn-install: 'pyenv install $py27_version' failed; it downloads Python-$py27_version.tar.xz" >&2
    echo "autobahn-install: from python.org: where that host is unreachable, put the tarball in" >&2
    echo "autobahn-install: \$PYTHON_BUILD_CACHE_PATH, or set AUTOBAHN_PYTHON2 to an existing python2.7" >&2
    exit 1
  fi
  py27="$(find_py27)"
fi
"$py27" -c 'import ssl, zlib, hashlib; print("autobahn-install:   " + __import__("sys").version.split()[0] + ", " + ssl.OPENSSL_VERSION)' \
  || { echo "autobahn-install: $py27 lacks ssl/zlib (pip cannot reach PyPI without them)" >&2; exit 1; }
echo "autobahn-install:   using $py27"
done_step "python 2.7"

venv="$home/venv"
stamp="$( (cat "$req"; echo "python=$py27 virtualenv=$virtualenv_version") | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/wstest" ] && [ "$(cat "$venv/.stamp" 2>/dev/null)" = "$stamp" ] \
   && [[ "$(wstest_version "$venv/bin/wstest")" == *"AutobahnTestSuite 0.8.2"* ]]; then
  echo "autobahn-install: reusing $venv"
else
  # 2. virtualenv for Python 2 ---------------------------------------------------------------
  start "virtualenv $virtualenv_version into $home/bootstrap"
  mkdir -p "$home"
  if ! PYTHONPATH="$home/bootstrap" "$py27" -c "import virtualenv, sys; sys.exit(virtualenv.__version__ != '$virtualenv_version')" 2>/dev/null; then
    rm -rf "$home/bootstrap"
    # the interpreter's own pip (pyenv's builds have one), else python3's: the wheel is universal
    "$py27" -m pip install -q --no-deps --target "$home/bootstrap" "virtualenv==$virtualenv_version" 2>/dev/null \
      || { rm -rf "$home/bootstrap"
           python3 -m pip install -q --no-deps --target "$home/bootstrap" "virtualenv==$virtualenv_version"; }
  fi
  done_step "virtualenv"

  # 3. the pinned test suite ---------------------------------------------------------------
  start "creating $venv and installing requirements-py27.txt"
  rm -rf "$venv"
  # --no-download: pip 20.3.4, setuptools 44.1.1 and wheel 0.36.2 come from virtualenv's own
  # wheels (the last of each for Python 2)
  PYTHONPATH="$home/bootstrap" "$py27" -m virtualenv -q --no-download "$venv"
  # Some pins are sdists with C code (wsaccel, zope.interface): gcc and the interpreter's
  # headers build them; pip caches the wheels it builds under ~/.cache/pip.
  "$venv/bin/pip" install -q -r "$req"
  "$venv/bin/pip" check
  if [[ "$(wstest_version "$venv/bin/wstest")" != *"AutobahnTestSuite 0.8.2"* ]]; then
    echo "autobahn-install: wstest -a does not report AutobahnTestSuite 0.8.2:" >&2
    "$venv/bin/wstest" -a >&2 || true
    exit 1
  fi
  echo "$stamp" > "$venv/.stamp"
  done_step "virtualenv + pip install"
fi
wstest_version "$venv/bin/wstest" | sed 's/^/autobahn-install:   /'
echo "autobahn-install: done in $(secs_since "$t_all")"
echo "$venv/bin/wstest"
