#!/usr/bin/env bash
# The GPU check of docs/benchmarks.md, as one script for a lent GPU machine (no network there).
#
# Prepare here (network): Python 3.12 wheels of what the GPU image lacks, and the inputs, in ignored folders:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     zarr numcodecs donfig google-crc32c polars pytrec-eval-terrier datasets dill multiprocess
#   mkdir -p .gpu && cp ../shared/data/msmarco-dl19-subset/corpus.jsonl .gpu/dl19_corpus.jsonl \
#     && cp ../shared/data/msmarco-dl19-subset/queries.jsonl .gpu/dl19_queries.jsonl
#   all-mpnet-base-v2 without model.safetensors (config + tokenizer) into .gpu/mpnet_shell/
# Run there, from the repository root, carrying .whl and .gpu:  bash bench/gpu_check.sh
# Results land in $OUT (or ./gpu-out): env, both benches' JSON and logs, the profile, the two pytest logs.
set -u
out="${OUT:-gpu-out}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 DDX_CACHE_DIR=/tmp/ddxcache
# Install into the interpreter's own environment (not --target): the `ddx` console script and torchrun's
# child processes must see ddx and its wheels too (the first H100 run lost 10 tests to exactly that).
python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 3
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 3
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc
  python3 -c "import torch,transformers,sentence_transformers,zarr,numpy;print(torch.__version__,torch.version.cuda,transformers.__version__,sentence_transformers.__version__,zarr.__version__,numpy.__version__)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
echo "== precompute bench"
timeout 300 python3 bench/gpu_precompute.py --corpus .gpu/dl19_corpus.jsonl --copies 1 --st-batch-sizes 32 128 \
  --token-budgets 65536 131072 --compile --json-out "$out/gpu_precompute.json" --profile-out "$out/profile.txt" \
  > "$out/gpu_precompute.log" 2>&1
echo "rc=$?"; tail -6 "$out/gpu_precompute.log"
echo "== train step bench"
timeout 120 python3 bench/gpu_train_step.py --student-shell .gpu/mpnet_shell --corpus .gpu/dl19_corpus.jsonl \
  --queries .gpu/dl19_queries.jsonl --json-out "$out/gpu_train_step.json" > "$out/gpu_train_step.log" 2>&1
echo "rc=$?"; tail -5 "$out/gpu_train_step.log"
echo "== tests"
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu -rs > "$out/pytest_gpu.txt" 2>&1
echo "rc=$?"; tail -3 "$out/pytest_gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs --timeout 120 > "$out/pytest_default.txt" 2>&1
echo "rc=$?"; tail -5 "$out/pytest_default.txt"
