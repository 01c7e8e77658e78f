#!/usr/bin/env bash
# A separate Python environment with pytorch-fid, for the two tests that compare our InceptionV3
# features and Fréchet distance with pytorch-fid's (tests/test_inception.py, tests/test_fid.py;
# they find it through REMEANFLOW_PYTORCH_FID_PYTHON, which .ci/run exports).
#
# Why separate: pytorch-fid needs torchvision, and PyPI's torchvision only loads beside the torch
# it was built with (2.14.1, a CUDA build, which needs its nvidia-* libraries even on the CPU);
# installed into .venv it would replace the project's torch 2.13.0 CPU build. pip on Python 3.11
# takes both torch wheels from this machine's disk. Cost, measured here on a busy 2-core machine:
# ~3.5 min and 5.6 GB; a no-op when the environment already works.
#
# Usage: bash .ci/pytorch_fid_env.sh [ENV_DIR]   (default .venv-fid; prints ENV_DIR's python)
set -euo pipefail
env_dir="${1:-.venv-fid}"
check="import pytorch_fid.inception, pytorch_fid.fid_score"
if ! "$env_dir/bin/python" -c "$check" >/dev/null 2>&1; then
    python3 -m venv "$env_dir"
    "$env_dir/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
    "$env_dir/bin/python" -m pip install -q pytorch-fid scipy numpy pillow
    "$env_dir/bin/python" -c "$check"  # fail here, with pip's output above, not in the tests
fi
echo "$(cd "$env_dir" && pwd)/bin/python"
