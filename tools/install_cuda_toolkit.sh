#!/usr/bin/env bash
# Installs nvcc and the static CUDA runtime inside a manylinux_2_28 (RHEL 8 family) container for
# the wheel builds: KVCORE_CUDA_MAJOR=12 (default, the `kvcore` package) or 13 (`kvcore-cu13`);
# KVCORE_CUDA_MAJOR=none skips it (a CPU-only wheel). Only the compiler and runtime headers and
# static libraries are needed: the driver (libcuda) is never linked.
set -euo pipefail
major="${KVCORE_CUDA_MAJOR:-12}"
[ "$major" = "none" ] && exit 0
case "$major" in
  12) minor=8 ;;
  13) minor=0 ;;
  *) echo "KVCORE_CUDA_MAJOR: expected 12, 13 or none, got $major" >&2; exit 1 ;;
esac
arch="$(uname -m)"
[ "$arch" = "aarch64" ] && repo_arch=sbsa || repo_arch=x86_64
dnf install -y -q dnf-plugins-core
dnf config-manager --add-repo "https://developer.download.nvidia.com/compute/cuda/repos/rhel8/${repo_arch}/cuda-rhel8.repo"
dnf install -y -q "cuda-nvcc-${major}-${minor}" "cuda-cudart-devel-${major}-${minor}" "cuda-driver-devel-${major}-${minor}"
ln -sfn "/usr/local/cuda-${major}.${minor}" /usr/local/cuda
/usr/local/cuda/bin/nvcc --version
