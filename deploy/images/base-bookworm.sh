#!/bin/sh
# Recipe of the base image the Dockerfiles build on (their PYTHON_IMAGE) where
# the default python:3.12-slim-bookworm cannot be had: Debian bookworm, its
# python3 and venv, and `python` (the Dockerfiles call it by that name).
# deploy/images/build.py runs it, adds this machine's pip settings and
# certificate bundle, and keys its cache by a hash of this file and of those.
#
#   base-bookworm.sh ROOTFS [MIRROR [KEYRING]]
#
# MIRROR and KEYRING are read from this machine's apt sources; without them
# debootstrap uses its own defaults.
set -eu
rootfs=$1
mirror=${2:-}
keyring=${3:-}

set -- --variant=minbase --include=python3,python3-venv,python-is-python3
if [ -n "$keyring" ]; then
  set -- "$@" --keyring="$keyring"
fi
if [ -n "$mirror" ]; then
  debootstrap "$@" bookworm "$rootfs" "$mirror"
else
  debootstrap "$@" bookworm "$rootfs"
fi

# Nothing of apt's downloads, lists or logs in the image.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
  "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/apt/* "$rootfs"/var/log/dpkg.log \
  "$rootfs"/var/log/bootstrap.log "$rootfs"/var/cache/debconf/*-old
