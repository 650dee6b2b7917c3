#!/bin/sh
# Make sure the machine has an OpenCL implementation that can compile kernels for its CPU.
#
# pip's PoCL (pocl-binary-distribution 3.0, LLVM 14) cannot compile for CPUs newer than
# LLVM 14 knows (e.g. AMD Zen 5: "unknown target CPU 'generic'"); Debian's PoCL 3.1 can.
# cnnc uses whichever OpenCL device builds kernels, so installing Debian's next to pip's
# is harmless elsewhere. Needs root and apt-get; otherwise it only says what to do.
set -u
if dpkg -s pocl-opencl-icd >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pocl-opencl-icd >/dev/null) \
    || echo "warning: could not install pocl-opencl-icd; relying on pip's PoCL" >&2
else
  echo "note: if cnnc reports that no OpenCL device can build kernels, install Debian's pocl-opencl-icd" >&2
fi
exit 0
