#!/usr/bin/env bash
# GPU readiness in one command: the `base` preset in bf16 with ZeRO-2 on every visible GPU, a
# fixed number of steps on in-memory synthetic batches, then on real shards (the built-in dataset
# at 224 px, sharded with `umt shard`'s code), then one table: samples/s, MFU, peak memory and
# data-wait fraction per run, and a `SUMMARY key=value ...` line. About 3 minutes on one H100.
#
#   benchmarks/gpu_smoke.sh          # on a machine with CUDA GPUs
#   benchmarks/gpu_smoke.sh --cpu    # shrunk: tiny preset, fp32, 1 gloo rank, a few steps (tests)
#
# Environment: UMT_SMOKE_OUT (work folder, default a new /tmp folder), UMT_SMOKE_NPROC (ranks,
# default: GPUs visible, 1 with --cpu), UMT_SMOKE_STEPS, UMT_SMOKE_BATCH, PYTHON.
set -euo pipefail

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
OUT="${UMT_SMOKE_OUT:-$(mktemp -d /tmp/umt-gpu-smoke.XXXXXX)}"
mkdir -p "$OUT"
START=$(date +%s)

if [[ "$MODE" == gpu ]]; then
  GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
  if [[ "$GPUS" -lt 1 ]]; then
    echo "gpu_smoke: no CUDA GPU visible to torch; use --cpu for the shrunk CPU run" >&2
    exit 2
  fi
  NPROC="${UMT_SMOKE_NPROC:-$GPUS}"
  PRESET=base; PRECISION=bf16; STEPS="${UMT_SMOKE_STEPS:-40}"; BATCH="${UMT_SMOKE_BATCH:-64}"
  LOG_EVERY=10; TEXT_LEN=40; SIDE=224; IMAGES=2048; PER_SHARD=64
  CORES=$(nproc)
  WORKERS=$(( CORES / NPROC > 8 ? 8 : (CORES / NPROC > 1 ? CORES / NPROC - 1 : 1) ))
  "$PYTHON" -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  NPROC="${UMT_SMOKE_NPROC:-1}"
  PRESET=tiny; PRECISION=fp32; STEPS="${UMT_SMOKE_STEPS:-4}"; BATCH="${UMT_SMOKE_BATCH:-8}"
  LOG_EVERY=2; TEXT_LEN=16; SIDE=32; IMAGES=64; PER_SHARD=16; WORKERS=1
fi
echo "gpu_smoke ($MODE): preset $PRESET, $PRECISION, ZeRO-2, $NPROC rank(s), $STEPS steps x" \
  "$BATCH per rank, work folder $OUT"

echo "[1/4] built-in dataset -> shards ($IMAGES images, ${SIDE}px)"
"$PYTHON" - "$OUT" "$IMAGES" "$SIDE" "$PER_SHARD" <<'EOF'
import sys
from pathlib import Path

from data_pipeline.builtin import write_split, write_tokenizer
from data_pipeline.shard import ShardOptions, shard_dataset

out, count, side, per_shard = Path(sys.argv[1]), *map(int, sys.argv[2:])
table = write_split(out / "data", "train", count, side)
options = ShardOptions(
    image_col="image", caption_col="captions", per="image", resize="none",
    image_format="png", skip_reencode=True, maxcount=per_shard, seed=0,
)
print("  " + shard_dataset(table, out / "shards", options).line())
write_tokenizer(out / "tokenizer")
EOF

COMMON=(
  "model.preset=$PRESET" "train.precision=$PRECISION" "zero.stage=2"
  "train.steps=$STEPS" "train.micro_batch_size=$BATCH" "train.warmup_steps=2" "train.lr=1e-4"
  "data.train.max_text_len=$TEXT_LEN" "data.tokenizer=$OUT/tokenizer"
  "log.every_steps=$LOG_EVERY" "eval.every_steps=0" "checkpoint.every_steps=0" "checkpoint.keep=1"
)

train() {  # run name (folder $OUT/run-NAME), extra overrides...
  local name=run-$1; shift
  rm -rf "${OUT:?}/$name"
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-$([[ $MODE == cpu ]] && echo 1 || echo 4)}" \
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 \
    "$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC" --master_addr=127.0.0.1 \
    --master_port="$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
    -m launch.train "output_dir=$OUT/$name" "${COMMON[@]}" "$@" \
    > "$OUT/$name.log" 2>&1 || { echo "gpu_smoke: run $name failed, tail of $OUT/$name.log:" >&2; tail -40 "$OUT/$name.log" >&2; exit 1; }
  echo "  $name: done ($(( $(date +%s) - START )) s since start)"
}

echo "[2/4] $STEPS steps on in-memory synthetic batches"
train synthetic "data.train.synthetic=true"
echo "[3/4] $STEPS steps on the shards ($WORKERS loader workers per rank)"
train shards "data.train.shards=$OUT/shards" "data.train.num_workers=$WORKERS" \
  "data.train.shuffle_buffer=256" "data.train.resampled=true"
echo "[4/4] report"
"$PYTHON" benchmarks/_gpu_smoke_report.py "$OUT/run-synthetic" "$OUT/run-shards"
echo "gpu_smoke: finished in $(( $(date +%s) - START )) s; logs and TensorBoard runs in $OUT"
