"""Under torchrun: evaluate an export on shards; rank 0 writes the report to argv[3]."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from umt.evaluate import EvalData, evaluate_retrieval  # noqa: E402
from umt.export import load_model  # noqa: E402

if __name__ == "__main__":
    model_dir, shards, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    model, processor = load_model(model_dir)
    data = EvalData(
        shards, processor.tokenizer, processor.image_size, processor.max_length, batch_size=3
    )
    report = evaluate_retrieval(model, data, rerank_k=4)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()
