#!/bin/bash
# Everything a lent GPU should run, in priority order, each step time-boxed; logs go to $OUT (or runs/gpu).
# Usage: bash bench/gpu_all.sh [STEP...]   steps: cuda generate kl tests hf smoke (default: cuda generate kl)
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (liger-kernel for bench/kl.py)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
for step in ${@:-cuda generate kl}; do
    echo "=== $step $(date -u +%H:%M:%S)"
    case $step in
        cuda) timeout 120 python3 -m pytest -q tests/test_model.py -k cuda ;;
        tests) timeout 300 python3 -m pytest -q -x tests/test_model.py tests/test_kernels.py tests/test_oel.py ;;
        generate) timeout 270 python3 bench/generate.py --no-hf ;;
        hf) timeout 420 python3 bench/generate.py --new 64 ;;
        kl) timeout 180 python3 bench/kl.py ;;
        smoke) timeout 540 python3 bench/train_smoke.py ;;
    esac > "$OUT/$step.log" 2>&1
    echo "=== $step exit $? $(date -u +%H:%M:%S)"; tail -n 14 "$OUT/$step.log"
done
