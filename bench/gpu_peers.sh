#!/usr/bin/env bash
# The peers harness on a lent GPU, bf16, in one short run (docs/benchmarks.md, "Peers on a GPU").
# Run on the device machine from the repository root, with the peers' wheels carried in .whl/peers
# (diffusers 0.39.0, importlib_metadata, lazy_importer, ml_collections; the image has jax, flax, optax, torch):
#   device run --carry .whl/peers 'bash bench/gpu_peers.sh'
# Each figure is printed as it is measured and copied under $OUT (the device tool's result folder), so a cut run
# keeps what it measured.
set -u
OUT=${OUT:-/tmp/gpu_peers}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/peers/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)" \
  | tee -a "$OUT/gpu.txt"
timeout 60 python3 bench/attention.py --dtype bfloat16 --batch_mult 2 --block_mib 16 --reps 5 2>&1 \
  | tee "$OUT/attention.txt"
timeout 330 python3 bench/peers.py --workload edm64 --dtype bfloat16 --batch 64 --steps 10 --child_timeout 110 \
  --only ours,torch,flax,flax_mem --json "$OUT/edm64.json" 2>&1 | tee "$OUT/edm64.txt"
timeout 180 python3 bench/peers.py --workload attn64 --dtype bfloat16 --batch 32 --steps 10 --child_timeout 80 \
  --only ours,torch,flax_mem --json "$OUT/attn64.json" 2>&1 | tee "$OUT/attn64.txt"
