#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine: the Fashion-MNIST package and a virtualenv
# with the pipeline, its extras and the test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# haproxy: Ray Serve's fast HTTP ingress for `vae-generate serve` (optional at run time).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || ! command -v python3 >/dev/null \
    || ! command -v haproxy >/dev/null; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist python3 python3-venv haproxy >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[train,serve,dev]"
