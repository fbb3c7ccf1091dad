"""What training adds to the network of `unified.py`: its pretraining objective and the logit
scale's DeepSpeed master copies. `build_model` builds the model that `umt train`, evaluation and
`umt.load` use; an export's remote code builds the same network without these (it needs neither
UMT's objectives nor DeepSpeed).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from umt.model.config import ModelConfig, preset_config
from umt.model.unified import LogitScale, UnifiedMultimodalTransformer, format_parameter_table
from umt.objectives.pretrain import pretraining_losses

log = logging.getLogger("umt.model")


def build_model(cfg: ModelConfig | str, log_table: bool = True) -> UnifiedMultimodalTransformer:
    """Build towers (from config or `from_pretrained`), fusion and heads, with the pretraining
    objective and a logit scale kept right under DeepSpeed; log a parameter table."""
    if isinstance(cfg, str):
        cfg = preset_config(cfg)
    scale = DeepSpeedLogitScale(cfg.logit_scale_init, cfg.logit_scale_max, cfg.logit_bias_init)
    model = UnifiedMultimodalTransformer.from_config(cfg, scale, pretraining_losses)
    if log_table:
        name = cfg.preset or "custom"
        log.info("model %s:\n%s", name, format_parameter_table(model.num_parameters()))
    return model


class DeepSpeedLogitScale(LogitScale):
    """A `LogitScale` whose every copy a DeepSpeed optimizer step may move is clamped after it,
    and whose fp32 buffers are set from DeepSpeed's fp32 masters under bf16/fp16."""

    @torch.no_grad()
    def start_(self) -> None:
        """After DeepSpeed's set-up of a fresh run. Under bf16/fp16 DeepSpeed built its fp32
        masters from the parameters it had already cast (14.25, not 14.29): put the exact
        initial values there. Every rank calls it."""
        for param, master, init, _ in self.copies():
            if param.dtype != torch.float32:
                _set_fp32_master(param, torch.full((1,), init, device=master.device))
        self.after_step()

    @torch.no_grad()
    def after_step(self) -> None:
        """Clamp every copy of the scale that an optimizer step may have moved: DeepSpeed's fp32
        master (ZeRO 1-2: this rank's fragment; ZeRO-3: this rank's partition) and the module's
        own copy, which the next forward reads; in place, with no host sync. Under bf16/fp16,
        then copy the full fp32 masters into the buffers (one collective of one value each).
        Every rank calls it (also after DeepSpeed's set-up and a resume)."""
        for param, master, _, bounds in self.copies():
            if bounds is not None:
                _clamp_everywhere(param, *bounds)
            if param.dtype != torch.float32:
                from deepspeed.utils import safe_get_full_fp32_param

                full = safe_get_full_fp32_param(param)
                master.copy_(full.reshape(1).float() if full is not None else param.float())
                self.master_synced = True


def _clamp_everywhere(param: nn.Parameter, low: float, high: float) -> None:
    if hasattr(param, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        local = safe_get_local_fp32_param(param)
        if local is not None:
            safe_set_local_fp32_param(param, local.clamp(low, high))
        param.ds_tensor.clamp_(low, high)
        return
    mapping = getattr(param, "_hp_mapping", None)  # ZeRO 1-2 and DeepSpeed's bf16 optimizer
    if mapping is not None and mapping.get_hp_fragment() is not None:
        mapping.get_hp_fragment().clamp_(low, high)
    param.clamp_(low, high)


def _set_fp32_master(param: nn.Parameter, exact: torch.Tensor) -> None:
    if hasattr(param, "ds_id"):  # ZeRO-3
        # DeepSpeed's safe_set_full_fp32_param fails for a parameter with fewer elements than
        # ranks: set this rank's slice of the padded value itself.
        import torch.distributed as dist
        from deepspeed.utils import safe_set_local_fp32_param

        size = param.ds_tensor.numel()
        padded = torch.zeros(size * dist.get_world_size(param.ds_process_group))
        padded[: exact.numel()] = exact.cpu()
        mine = padded.narrow(0, size * dist.get_rank(param.ds_process_group), size)
        safe_set_local_fp32_param(param, mine.to(exact.device))
        param.ds_tensor.copy_(mine)
    else:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, exact)


class MLMHead(nn.Module):
    """Fused width -> text width -> vocabulary, decoder tied to the text tower's word embeddings."""
