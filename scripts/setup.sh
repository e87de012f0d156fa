#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine: the Fashion-MNIST package, a virtualenv with the
# pipeline, its extras and the test tools, and the JavaScript side (the browser page's
# onnxruntime-web, the Node program's onnxruntime-node). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# haproxy: Ray Serve's fast HTTP ingress for `vae-generate serve` (optional at run time).
# chromium: the browser the page's tests drive (Debian's: no browser download).
# nodejs + npm: only when no Node is installed (another Node's npm conflicts with Debian's).
packages=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || packages+=(dataset-fashion-mnist)
command -v python3 >/dev/null && python3 -c "import venv, ensurepip" 2>/dev/null || packages+=(python3 python3-venv)
command -v haproxy >/dev/null || packages+=(haproxy)
command -v chromium >/dev/null || packages+=(chromium)
command -v npm >/dev/null || packages+=(nodejs npm)
if [ ${#packages[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[train,serve,tracking,dev]"
# The JavaScript packages, exactly as locked, from the npm registry only (deploy/node/.npmrc
# stops onnxruntime-node fetching its CUDA provider from elsewhere); then the page's build
# step copies onnxruntime-web's files into deploy/web/ort/, which the page is served from.
npm ci --prefix deploy/web --no-audit --no-fund --loglevel=error
npm run build --prefix deploy/web --silent
ONNXRUNTIME_NODE_INSTALL=skip npm ci --prefix deploy/node --no-audit --no-fund --loglevel=error
