#!/bin/bash
# Everything a lent GPU should run, in priority order, each step time-boxed; logs go to $OUT (or runs/gpu).
# Usage: bash bench/gpu_all.sh [STEP...]   steps: cuda kernels generate ab kl tests hf smoke profile sweep
#        consolidate consolidate4b (default: cuda generate kl)
# Liger-Kernel for bench/kl.py travels as a wheel in .whl/ (git-ignored; carry it): fetch it on a networked machine
# with `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel`.
# `ab` times another version of model.py beside today's at batch 1: put it in .ab/model_next.py (git-ignored) and
# carry .ab. Each compiled decode step costs about 100 s of compilation on a cold machine.
# The lent GPU's image has torch 2.11 and triton 3.6 but not textworld, so `tests` leaves the games tests out.
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (liger-kernel for bench/kl.py)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
for step in ${@:-cuda generate kl}; do
    echo "=== $step $(date -u +%H:%M:%S)"
    case $step in
        cuda) timeout 120 python3 -m pytest -q tests/test_model.py -k cuda ;;
        kernels) timeout 180 python3 -m pytest -q tests/test_kernels.py ;;
        tests) timeout 540 python3 -m pytest -q -x tests/test_model.py tests/test_kernels.py tests/test_oel.py ;;
        generate) timeout 450 python3 bench/generate.py --no-hf ;;
        ab) timeout 400 python3 bench/generate.py --no-hf --batch 1 --other .ab/model_next.py ;;
        hf) timeout 420 python3 bench/generate.py --new 64 ;;
        kl) timeout 180 python3 bench/kl.py ;;
        smoke) timeout 540 python3 bench/train_smoke.py ;;
        profile) timeout 240 python3 bench/generate.py --profile ;;
        sweep) timeout 300 python3 bench/kl_sweep.py ;;
        consolidate) timeout 300 python3 bench/consolidate.py ;;
        consolidate4b) timeout 400 python3 bench/consolidate.py --shape 4b --offload --steps 1 ;;
        *) echo "unknown step $step (steps: cuda kernels tests generate ab hf kl smoke profile sweep consolidate consolidate4b)"; false ;;
    esac > "$OUT/$step.log" 2>&1
    echo "=== $step exit $? $(date -u +%H:%M:%S)"; tail -n 14 "$OUT/$step.log"
done
