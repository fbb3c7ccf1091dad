"""UMT: pretraining of unified multimodal (image + text) transformers.

The library part (model, objectives, config, checkpoint, evaluation) imports nothing from
`data_pipeline` or `launch`.
"""

__version__ = "0.1.0"

from umt import hf_registration as _hf_registration  # noqa: E402

_hf_registration.install()  # AutoConfig/AutoModel resolve `umt` exports, at no import cost


def load(path, device="cpu"):
    """`(model, processor)` from a `umt export` folder, without DeepSpeed."""
    from umt.export import load as _load

    return _load(path, device)
