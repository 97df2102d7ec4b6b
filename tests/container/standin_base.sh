#!/usr/bin/env bash
# Build the stand-in for the NGC PyTorch base image, for CI machines that cannot reach nvcr.io
# and have no GPU: a Debian bookworm root file system (debootstrap) with Python 3.11 in a venv
# on PATH and the CPU torch 2.13.0 wheel with its dependencies, committed as a local image.
# Like NGC, torch and its helpers are preinstalled outside the lock, so the Dockerfile's
# "never touch the base's torch" guard is exercised for real.
set -euo pipefail

usage() {
    echo "usage: $0 IMAGE_TAG WORK_DIR" >&2
    echo "  builds IMAGE_TAG with buildah; WORK_DIR holds the rootfs and wheels (kept)" >&2
    exit 64
}

[[ $# -eq 2 ]] || usage
tag="$1"
work="$2"
: "${DEBIAN_MIRROR:=http://deb.debian.org/debian}"
: "${TORCH_VERSION:=2.13.0}"

mkdir -p "$work"
rootfs="$work/rootfs"
wheels="$work/base-wheels"

if [[ ! -x "$rootfs/usr/bin/python3" ]]; then
    echo "standin_base: debootstrap bookworm into $rootfs" >&2
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,iproute2 \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >&2
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
fi

# torch and its dependencies come from the host's pip configuration (the CPU wheel), fetched
# for the rootfs' Python; wheel + setuptools stand in for NGC's build tools (deepspeed sdist).
mkdir -p "$wheels"
pip download --quiet --dest "$wheels" --only-binary :all: \
    --python-version 3.11 --platform manylinux_2_28_x86_64 --implementation cp \
    "torch==$TORCH_VERSION" wheel setuptools >&2

tar_file="$work/rootfs.tar"
tar --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -C "$rootfs" -cf "$tar_file" .

ctr="$(buildah from scratch)"
trap 'buildah rm "$ctr" >/dev/null' EXIT
buildah add "$ctr" "$tar_file" / >/dev/null
buildah run --isolation chroot -v "$wheels:/wheels:ro" "$ctr" -- \
    sh -c "python3 -m venv /opt/venv && /opt/venv/bin/pip install --quiet --no-cache-dir \
        --no-index --find-links /wheels torch==$TORCH_VERSION wheel setuptools" >&2
buildah config \
    --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --label org.opencontainers.image.title="llmtrain CI stand-in for the NGC PyTorch base" \
    --cmd /bin/bash "$ctr"
buildah commit --quiet --rm "$ctr" "$tag" >/dev/null
trap - EXIT
rm -f "$tar_file"
echo "standin_base: built $tag" >&2
