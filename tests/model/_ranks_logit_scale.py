"""Under torchrun (2 gloo ranks): a logit scale that Adam first drives towards 200 (past the
bound of 100), then towards 30, trained through DeepSpeed at ZeRO stages 0-3 (fp32) and 1-3
(bf16) with the clamp the trainer applies after each step. Rank 0 writes {stage: [the forward's
scale before any step, the master's after each step, the forward's after the last]} to argv[1]."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from umt.engine import clamp_logit_scale, start_logit_scale  # noqa: E402
from umt.model.unified import LogitScale  # noqa: E402

STEPS, LR = 40, 0.1
TARGETS = [200.0] * (STEPS // 2) + [30.0] * (STEPS // 2)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.logit_scale = LogitScale(math.log(1 / 0.07), math.log(100))
        self.other = nn.Linear(4, 4)  # something else for ZeRO to partition

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        return (self.logit_scale() - target) ** 2 / 1e4 + 0 * self.other.weight.sum()


def through_deepspeed(stage: int, bf16: bool = False) -> list[float]:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    torch.manual_seed(0)
    toy = Toy()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
    }
    optimizer = torch.optim.Adam(toy.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=toy, optimizer=optimizer, config=config)
    start_logit_scale(engine.module.logit_scale)  # as the trainer does after set-up
    with torch.no_grad():
        scales = [float(engine(torch.tensor(0.0)).sqrt() * 100)]  # before any step
    for target in TARGETS:
        loss = engine(torch.tensor(target))
        engine.backward(loss)
        engine.step()
        clamp_logit_scale(engine.module.logit_scale)
        master = safe_get_full_fp32_param(engine.module.logit_scale.log_scale)
        if master is None:  # stage 0 without a DeepSpeed optimizer wrapper: the param is the master
            master = engine.module.logit_scale.log_scale
        scales.append(float(master.reshape(-1)[0].exp()))
    # The copy the next forward reads equals the clamped master.
    with torch.no_grad():
        scales.append(float(engine(torch.tensor(0.0)).sqrt() * 100))
    return scales


def main(out: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {str(stage): through_deepspeed(stage) for stage in (0, 1, 2, 3)}
    results |= {f"{stage}-bf16": through_deepspeed(stage, bf16=True) for stage in (1, 2, 3)}
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
