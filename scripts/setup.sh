#!/usr/bin/env bash
# Set up everything diskrsync needs on a fresh Debian machine: system packages (FUSE, sshd,
# filesystem tools, OpenStack Swift with s3api as the tests' real S3 service), then a virtual environment in .venv with the project installed editable.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in fuse3 libfuse3-dev pkg-config openssh-server openssh-client e2fsprogs xfsprogs gdisk fdisk \
        btrfs-progs dosfstools qemu-system-common qemu-utils; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
# the tests' S3 service (tests/support/swift.py); without --no-install-recommends it pulls GTK
swift=()
for pkg in swift swift-proxy swift-account swift-container swift-object python3-swift memcached; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || swift+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ${#swift[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${swift[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${swift[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.diskrsync-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing diskrsync and its dependencies into .venv"
    if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[dev]'; } \
            > .venv/install.log 2>&1; then
        cat .venv/install.log >&2
        echo "setup: pip install failed (log above)" >&2
        exit 1
    fi
    touch "$stamp"
fi
echo "setup: ready (.venv/bin/diskrsync)"
