#!/usr/bin/env bash
# The peers harness on a lent GPU, bf16, in one run that fits one device call (docs/benchmarks.md, "Peers on a GPU").
# Run on the device machine from the repository root, with the peers' wheels carried in .whl/peers
# (diffusers 0.39.0, importlib_metadata, lazy_importer, ml_collections; the image has jax, flax, optax, torch):
#   device run --carry .whl/peers --timeout_s 600 'bash bench/gpu_peers.sh'
#   WORKLOAD=attn64 BATCH=32 bash bench/gpu_peers.sh        # the other workload, in a second call
# On an H100 (2026-11-26) the JAX children's set-up + compile took over 110 s at edm64 batch 64 (XLA's GPU
# autotuning; --xla_gpu_autotune_level=0 dropped its bf16 matmul from 772 to 10 TFLOP/s: never use it), so each
# child gets up to 330 s and --deadline 545 ends the run with its report inside one call. Figures are printed as
# measured; summary, JSON and each child's log (its phases, timestamped) land under $OUT (the device tool's result folder), so a cut run keeps what it measured.
set -u
OUT=${OUT:-/tmp/gpu_peers}
WORKLOAD=${WORKLOAD:-edm64}
BATCH=${BATCH:-64}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/peers/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)" \
  | tee -a "$OUT/gpu.txt"
timeout 570 python3 bench/peers.py --workload "$WORKLOAD" --dtype bfloat16 --batch "$BATCH" --steps 10 --deadline 545 \
  --child_timeout 330 --only ours,torch,flax_mem --logdir "$OUT/logs" --json "$OUT/$WORKLOAD.json" 2>&1 \
  | tee "$OUT/$WORKLOAD.txt"
