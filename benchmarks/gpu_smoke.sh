#!/usr/bin/env bash
# GPU readiness in one command, for the first run on a GPU machine (about 10 minutes on one GPU):
#   [2] the `base` preset, bf16, ZeRO-2, on in-memory synthetic batches kept on the device:
#       samples/s, MFU, peak memory, and host-device syncs per step (torch's sync debug mode);
#   [3] run [2] again with `model.compile: true` (GPU mode only): compiled against eager
#       (SUMMARY `compiled_vs_eager`; the first logged window, which holds the compile, is left out);
#   [4] the same on real shards through the loader: the data-wait fraction;
#   [5] ZeRO-3 steps with periodic retrieval evaluation and ITM re-ranking inside training
#       (every forward a collective: the ranks must run in lockstep);
#   [6] checkpoint + resume of run [2] (`--resume auto`, a few more steps);
#   [7] `umt eval` under torchrun with NCCL and ITM re-ranking, on the checkpoint of [2];
# then one table and a `SUMMARY key=value ...` line.
#
#   benchmarks/gpu_smoke.sh          # on a machine with CUDA GPUs
#   benchmarks/gpu_smoke.sh --cpu    # shrunk: tiny preset, fp32, gloo, a few steps (CI runs it)
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
  LOG_EVERY=10; TEXT_LEN=40; SIDE=224; IMAGES=2048; TEST_IMAGES=256; PER_SHARD=64
  Z3_STEPS=6; RESUME_STEPS=5; RERANK=16
  CORES=$(nproc)
  WORKERS=$(( CORES / NPROC > 8 ? 8 : (CORES / NPROC > 1 ? CORES / NPROC - 1 : 1) ))
  "$PYTHON" -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  NPROC="${UMT_SMOKE_NPROC:-1}"
  PRESET=tiny; PRECISION=fp32; STEPS="${UMT_SMOKE_STEPS:-4}"; BATCH="${UMT_SMOKE_BATCH:-8}"
  LOG_EVERY=2; TEXT_LEN=16; SIDE=32; IMAGES=64; TEST_IMAGES=20; PER_SHARD=16; WORKERS=1
  Z3_STEPS=2; RESUME_STEPS=2; RERANK=4
fi
echo "gpu_smoke ($MODE): preset $PRESET, $PRECISION, $NPROC rank(s), $STEPS steps x" \
  "$BATCH per rank, work folder $OUT"

echo "[1/8] built-in dataset -> shards ($IMAGES + $TEST_IMAGES images, ${SIDE}px)"
"$PYTHON" - "$OUT" "$IMAGES" "$TEST_IMAGES" "$SIDE" "$PER_SHARD" <<'EOF'
import sys
from pathlib import Path

from data_pipeline.builtin import write_split, write_tokenizer
from data_pipeline.shard import ShardOptions, shard_dataset

out, count, test_count, side, per_shard = Path(sys.argv[1]), *map(int, sys.argv[2:])
for split, n in (("train", count), ("test", test_count)):
    table = write_split(out / "data", split, n, side)
    options = ShardOptions(
        image_col="image", caption_col="captions", per="image", resize="none",
        image_format="png", skip_reencode=True, maxcount=per_shard, seed=0,
    )
    print(f"  {split}: " + shard_dataset(table, out / "shards" / split, options).line())
write_tokenizer(out / "tokenizer")
EOF

COMMON=(
  "model.preset=$PRESET" "train.precision=$PRECISION" "zero.stage=2"
  "train.steps=$STEPS" "train.micro_batch_size=$BATCH" "train.warmup_steps=2" "train.lr=1e-4"
  "data.train.max_text_len=$TEXT_LEN" "data.eval.max_text_len=$TEXT_LEN"
  "data.tokenizer=$OUT/tokenizer" "log.every_steps=$LOG_EVERY" "eval.every_steps=0"
  "checkpoint.every_steps=0" "checkpoint.keep=1"
)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$([[ $MODE == cpu ]] && echo 1 || echo 4)}"
port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

launch() {  # log file, torchrun arguments...
  local log=$1; shift
  "$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC" --master_addr=127.0.0.1 \
    --master_port="$(port)" "$@" > "$log" 2>&1 \
    || { echo "gpu_smoke: $log failed; its tail:" >&2; tail -40 "$log" >&2; exit 1; }
}

train() {  # run name (folder $OUT/run-NAME, fresh), extra overrides...
  local name=run-$1; shift
  rm -rf "${OUT:?}/$name"
  launch "$OUT/$name.log" -m launch.train "output_dir=$OUT/$name" "${COMMON[@]}" "$@"
  echo "  $name: done ($(( $(date +%s) - START )) s since start)"
}

echo "[2/8] $STEPS steps on synthetic batches kept on the device, host syncs counted"
UMT_SYNC_DEBUG=1 train synthetic "data.train.synthetic=true" "data.train.synthetic_distinct=8"
COMPILED=()
if [[ "$MODE" == gpu ]]; then
  echo "[3/8] run [2] again with model.compile=true (inductor; its first steps compile)"
  UMT_SYNC_DEBUG=1 train compiled "data.train.synthetic=true" "data.train.synthetic_distinct=8" \
    "model.compile=true"
  COMPILED=("$OUT/run-compiled")
else
  echo "[3/8] compiled steps: GPU mode only (an inductor compile takes minutes on CPU)"
fi
echo "[4/8] $STEPS steps on the shards ($WORKERS loader workers per rank)"
train shards "data.train.shards=$OUT/shards/train" "data.train.num_workers=$WORKERS" \
  "data.train.shuffle_window=256" "data.train.resampled=true"
echo "[5/8] $Z3_STEPS ZeRO-3 steps with retrieval evaluation (ITM re-rank top $RERANK) inside"
train zero3 "data.train.synthetic=true" "zero.stage=3" "zero.stage3_param_persistence_threshold=0" \
  "train.steps=$Z3_STEPS" "data.eval.shards=$OUT/shards/test" "eval.every_steps=$Z3_STEPS" \
  "eval.itm_rerank_k=$RERANK"
echo "[6/8] resume run [2] from its checkpoint for $RESUME_STEPS more steps"
RESUME_START=$(date +%s.%N)
launch "$OUT/run-synthetic-resume.log" -m launch.train --resume auto "output_dir=$OUT/run-synthetic" \
  "${COMMON[@]}" "data.train.synthetic=true" "data.train.synthetic_distinct=8" \
  "train.steps=$(( STEPS + RESUME_STEPS ))"
RESUME_S=$("$PYTHON" -c "import time; print(f'{time.time() - $RESUME_START:.1f}')")
grep -q "resumed from" "$OUT/run-synthetic-resume.log" \
  || { echo "gpu_smoke: the resumed run did not say 'resumed from'" >&2; exit 1; }
echo "  resumed and trained to step $(( STEPS + RESUME_STEPS )) in $RESUME_S s"
echo "[7/8] umt eval under torchrun (ITM re-rank top $RERANK) on that checkpoint"
EVAL_START=$(date +%s.%N)
launch "$OUT/eval.log" -m launch.cli eval --model "$OUT/run-synthetic/checkpoints" \
  --shards "$OUT/shards/test" --itm-rerank "$RERANK" --out "$OUT/eval.json"
EVAL_S=$("$PYTHON" -c "import time; print(f'{time.time() - $EVAL_START:.1f}')")
echo "[8/8] report"
"$PYTHON" benchmarks/_gpu_smoke_report.py "$OUT/run-synthetic" ${COMPILED[@]+"${COMPILED[@]}"} \
  "$OUT/run-shards" "$OUT/run-zero3" \
  --eval "$OUT/eval.json" --eval-seconds "$EVAL_S" --resume-seconds "$RESUME_S"
echo "gpu_smoke: finished in $(( $(date +%s) - START )) s; logs and TensorBoard runs in $OUT"
