#!/usr/bin/env bash
# The GPU checks, for a machine with one CUDA GPU (a few minutes): the tests marked `gpu` and `llm bench`
# on cuda in fp16, bf16, torchao int4 and bitsandbytes nf4. Run from the repository root after the
# README's test install:
#   bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
python -m pytest -q -m gpu tests/test_gpu.py
for dtype in float16 bfloat16; do
  llm bench --device cuda --dtype "$dtype" -p 128,512 -n 64 -r 2 -b 1,8
done
for scheme in int4 nf4; do
  llm bench --device cuda --dtype bfloat16 --quantize "$scheme" -p 128 -n 64 -r 2 -b 1,8
done
