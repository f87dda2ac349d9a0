#!/usr/bin/env bash
# GPU checks and timings in one go, for a machine with a CUDA GPU, torch and triton (vLLM not
# needed): the Triton kernels against the PyTorch reference on CUDA (token for token, and the
# chi-square law test through the compiled kernels), verifier timings, and the real-shape cost
# model at batch 1 and 16. Usage: benchmarks/gpu_check.sh OUT_DIR   (from the repository root)
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# Without `pip install`, make vllm_specdiff.kernels importable from the checkout (setup.py maps it).
[ -e vllm_specdiff/kernels ] || ln -s ../kernels vllm_specdiff/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
echo "== kernels vs reference on CUDA"
timeout 300 $PY tests/test_kernels.py cuda > "$OUT/kernels_cuda.json" 2> "$OUT/kernels_cuda.log"
echo "rc $?"; tail -c 600 "$OUT/kernels_cuda.json"
echo "== pytest: CUDA tests"
timeout 300 $PY -m pytest -v -p no:cacheprovider tests/test_generate.py tests/test_kernels.py \
    tests/test_verification.py -k "cuda or sm90" -rs 2>&1 | tee "$OUT/pytest-cuda.txt" | tail -15
echo "== verifier timings"
for extra in "" "--temperature 0" "--one-hot"; do
    timeout 200 $PY benchmarks/bench_rejection.py $extra --out "$OUT/rejection-cuda.jsonl"
done
echo "== cost model"
for batch in 1 16; do
    timeout 300 $PY benchmarks/cost_model.py --batch $batch --windows 256,1024 \
        --from-results benchmarks/results/offline-sweep.jsonl --out "$OUT" --tag "cuda-b$batch"
done
