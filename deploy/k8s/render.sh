#!/bin/sh
# One overlay of deploy/k8s rendered as committed under deploy/k8s/rendered/, so the
# manifests can be read, applied and checked where no kustomize renderer is installed.
# `make deploy-render` writes them all; tests/unit/test_deploy_files.py compares them with
# this script's output where kubectl is installed.
# Usage: render.sh OVERLAY [K8S_DIR]
set -eu
overlay=$1
k8s=${2:-$(dirname "$0")}
# Rendered first, so a failing kustomize prints no header of a file it did not make.
body=$(kubectl kustomize "$k8s/overlays/$overlay")
cat <<EOF
# Generated from deploy/k8s/overlays/$overlay by \`make deploy-render\` (deploy/k8s/render.sh,
# kubectl kustomize). Do not edit: change deploy/k8s/base or the overlay and regenerate;
# make test fails while this file and a fresh render differ (where kubectl is installed).
EOF
printf '%s\n' "$body"
