"""UMT: pretraining of unified multimodal (image + text) transformers.

`launch` (the commands) stands on `umt`, which stands on `data_pipeline`; no import runs upward
(tests/test_layers.py). Within `umt`:
- the library: `umt.model` imports nothing outside itself (an export carries it as remote
  code); `umt.objectives` only itself, `umt.distributed` and how samples are identified
  (`data_pipeline.sample_ids`); `config`, `distributed`, `flops`, `shipped`, `versions`;
- the application side, where model, objectives, data and DeepSpeed meet: `train` (with
  `engine`, `train_data`, `cached_step`, `metrics`, `threads`, `step_log`, `data_wait`),
  `checkpoint`, `run_config`, `preflight`, `evaluate`, `export`, `model_card`, `logs`.
"""

__version__ = "0.1.0"

from umt import hf_registration as _hf_registration  # noqa: E402

_hf_registration.install()  # AutoConfig/AutoModel resolve `umt` exports, at no import cost


def load(path, device="cpu"):
    """`(model, processor)` from a `umt export` folder, without DeepSpeed."""
    from umt.export import load as _load

    return _load(path, device)
