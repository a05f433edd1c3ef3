#!/usr/bin/env bash
# Installs tandem and everything its CPU tests and demo need, idempotently.
# Order matters: the CPU torch wheel must be in place before nixl, which otherwise pulls a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."

# Mooncake's wheel links libibverbs/librdmacm/libnuma even for tcp. --no-install-recommends keeps
# ibverbs-providers out, whose IB module can crash UCX at process exit.
need_apt=0
for lib in libibverbs.so.1 librdmacm.so.1 libnuma.so.1; do
    ldconfig -p | grep -q "$lib" || need_apt=1
done
if [ "$need_apt" = 1 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        libibverbs1 librdmacm1 libnuma1 >/dev/null
fi

PIP="python3 -m pip install -q --disable-pip-version-check"
python3 -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"
$PIP -e ".[test,nixl,mooncake,bench,fast]"
# Hugging Face's `kernels` distribution (pulled in by transformers >= 5.25 on machines set up before the pin)
# has the import name of tandem's `kernels/` package: transformers would import ours in its place and fail.
if python3 -m pip show -q kernels >/dev/null 2>&1; then
    python3 -m pip uninstall -y -q kernels
fi
