#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine (see benchmarks/RESULTS.md).
# Run from the repository root, with pyro's wheels in .whl/ (the GPU image has torch,
# gpytorch, linear_operator, scikit-learn and hypothesis, but not pyro) and ggplot2's
# diamonds table in .benchdata/diamonds.csv. Writes its logs and JSON to ${OUT:-gpu_out}.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, gpytorch, linear_operator, pyro; print(torch.__version__, torch.version.cuda, gpytorch.__version__, linear_operator.__version__, pyro.__version__)"
# 1. the GPU tests (everything on the device, equal to the CPU results)
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_preconditioners.py tests/test_kronecker.py 2>&1 | tee "$out/gpu_tests.log"
# 2. the preconditioner benchmark with the Kronecker default (main table, crossover, reuse)
timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_precond.py --device cuda \
    --csv .benchdata/diamonds.csv --json "$out/bench_precond_cuda.json" 2>&1 |
    tee "$out/bench_precond_cuda.log"
# 3. the convolution benchmark: ResNet-style CNN at N = 512 (dense K at 256), ResNet-18
#    shape at N = 1024, peak CUDA memory of one K·v per engine against forward+backward
timeout "${BENCH_CONV_TIMEOUT:-420}" python3 benchmarks/bench_conv.py --device cuda \
    --n 512 --n-dense 256 --n18 1024 --json "$out/bench_conv_cuda.json" 2>&1 |
    tee "$out/bench_conv_cuda.log"
# 4. end to end at N = 10⁵: NTKGPRegression (CG) fitted, posterior mean and variances at
#    10⁴ test points, for the MLP of step 2 and the ResNet-style CNN (one output)
timeout "${E2E_MLP_TIMEOUT:-300}" python3 benchmarks/bench_e2e.py --device cuda --networks mlp \
    --n 100000 --m 10000 --csv .benchdata/diamonds.csv --no-progress \
    --json "$out/bench_e2e_mlp_cuda.json" 2>&1 | tee "$out/bench_e2e_mlp_cuda.log"
timeout "${E2E_CNN_TIMEOUT:-420}" python3 benchmarks/bench_e2e.py --device cuda --networks cnn \
    --n 100000 --m 10000 --chunk-size 25000 --no-progress \
    --json "$out/bench_e2e_cnn_cuda.json" 2>&1 | tee "$out/bench_e2e_cnn_cuda.log"
