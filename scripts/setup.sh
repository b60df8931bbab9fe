#!/usr/bin/env bash
# Sets up tftrain on a fresh Debian machine: the embedded Fashion-MNIST from
# Debian, Chromium, and a virtual environment in .venv with tftrain, its test
# tools and TensorBoard's profile plugin.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "setup: installing Debian's dataset-fashion-mnist"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null
  }
fi

# Headless Chromium, for the test that looks at TensorBoard as a person would.
if ! command -v chromium >/dev/null 2>&1; then
  echo "setup: installing Debian's chromium (for the TensorBoard screenshot test)"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q chromium >/dev/null 2>&1 ||
    echo "setup: could not install chromium; that one test will be skipped" >&2
fi

# openssl makes the test CA of the bucket tests (tests/test_bucket.py).
if ! command -v openssl >/dev/null 2>&1; then
  echo "setup: installing Debian's openssl (for the bucket tests' certificates)"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q openssl >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q openssl >/dev/null
  } || echo "setup: could not install openssl; tests/test_bucket.py will fail" >&2
fi

# A one-machine Slurm cluster for tests/test_slurm.py (it starts its own
# daemons, with its own config and ports; nothing is enabled here).
if ! command -v slurmd >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  echo "setup: installing Debian's slurmctld, slurmd, slurm-client and munge (for the Slurm test)"
  export DEBIAN_FRONTEND=noninteractive
  pkgs="slurmctld slurmd slurm-client munge"
  $SUDO apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q --no-install-recommends $pkgs >/dev/null
  } || echo "setup: could not install Slurm; tests/test_slurm.py will fail" >&2
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "setup: installing tftrain and its dependencies into .venv"
log=.venv/setup-pip.log
if ! { .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip &&
       .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,profile]"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "setup: pip failed (the log above is also in $log)" >&2
  exit 1
fi
echo "setup: done (.venv/bin/tftrain)"
